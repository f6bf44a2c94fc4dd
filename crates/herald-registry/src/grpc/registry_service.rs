//! `herald.v1.RegistryInternal`: what edges and `herald ctl` ask of a registry member.
//!
//! Writes (`Register`, `KeepAlive`, `UpdateInterest`, membership changes) are served by the leader only; any other
//! member answers `FAILED_PRECONDITION` with the leader's address in [`LEADER_HEADER`], or `UNAVAILABLE` while no
//! leader is known, so a client ([`crate::client::RegistryClient`]) retries in the right place. Reads (`Watch`,
//! `Status`) are served by every member from its applied state. Every input is validated here, before it can
//! reach the log: a bad edge id, address or room is `INVALID_ARGUMENT`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::Authority;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use herald_proto::v1 as pb;
use herald_proto::v1::registry_internal_server::{RegistryInternal, RegistryInternalServer};

use herald_telemetry::Parent;
use tracing::Instrument;

use crate::batcher::{BatchOutcome, MAX_BATCH_CHANGES};
use crate::grpc::convert::{event_to_proto, snapshot_to_proto};
use crate::grpc::{ClusterSecret, SecretCheck};
use crate::node::Core;
use crate::store::{StateMachineStore, WatchEvent, WatchStart};
use crate::types::{InterestChange, NodeId, RegistryNode, Request as LogRequest, TypeConfig};

/// The metadata key a follower puts the leader's address in when it refuses a write.
pub const LEADER_HEADER: &str = "x-herald-leader";

/// The longest edge id accepted, in bytes.
pub const MAX_EDGE_ID_BYTES: usize = 128;

/// The longest lease TTL accepted: an edge silent for longer than this is gone, whatever it asked for.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// How many events a watch stream buffers for a slow reader before the member stops reading the live feed for
/// it (it then catches up from the event ring, or with a fresh snapshot).
const WATCH_BUFFER: usize = 64;

/// The registry service as served: [`RegistryService`] behind [`SecretCheck`].
pub type RegistryServer = InterceptedService<RegistryInternalServer<RegistryService>, SecretCheck>;

/// The registry service of one member. Made by [`crate::node::start`], which serves it next to the raft service.
#[derive(Clone)]
pub struct RegistryService {
    core: Arc<Core>,
}

impl std::fmt::Debug for RegistryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryService")
            .field("node_id", &self.core.id)
            .finish_non_exhaustive()
    }
}

/// The registry service over `core`, refusing calls without `secret` and requests over `max_request_bytes`.
///
/// Replies are not capped: a watch snapshot carries the whole state in one message, and only members (holding
/// the secret) can ask for one.
pub(crate) fn registry_server(
    core: Arc<Core>,
    secret: ClusterSecret,
    max_request_bytes: usize,
) -> RegistryServer {
    let server = RegistryInternalServer::new(RegistryService { core })
        .max_decoding_message_size(max_request_bytes)
        .max_encoding_message_size(usize::MAX);
    InterceptedService::new(server, SecretCheck::new(secret))
}

/// The largest endpoint or route definition accepted, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 16 * 1024;

fn validate_table_name(what: &str, name: &str) -> Result<(), Status> {
    herald_routes::validate_name(what, name).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn parse_definition(json: &str) -> Result<serde_json::Value, Status> {
    if json.len() > MAX_DEFINITION_BYTES {
        return Err(Status::invalid_argument(format!(
            "definition is larger than {MAX_DEFINITION_BYTES} bytes"
        )));
    }
    serde_json::from_str(json)
        .map_err(|e| Status::invalid_argument(format!("definition is not JSON: {e}")))
}

/// Checks that `addr` is `host:port` (a name or an IP, IPv6 in brackets; a non-zero port), which is what the
/// registry hands to other edges and members to dial.
pub(crate) fn validate_host_port(addr: &str) -> Result<(), String> {
    let authority: Authority = addr
        .parse()
        .map_err(|e| format!("not a host:port address: {e}"))?;
    if authority.as_str() != addr || addr.contains('@') {
        return Err("not a host:port address".into());
    }
    match authority.port_u16() {
        Some(0) | None => return Err("needs a non-zero port".into()),
        Some(_) => {}
    }
    if authority.host().is_empty() {
        return Err("needs a host".into());
    }
    Ok(())
}

fn validate_edge(edge: &str) -> Result<(), Status> {
    if edge.is_empty() {
        return Err(Status::invalid_argument("edge id is empty"));
    }
    if edge.len() > MAX_EDGE_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "edge id is longer than {MAX_EDGE_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Parses each room and returns it in canonical form, so two edges spelling one room differently (key order,
/// whitespace) key the same interest.
fn canonical_rooms(rooms: Vec<String>) -> Result<Vec<String>, Status> {
    rooms
        .into_iter()
        .map(|text| {
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Status::invalid_argument(format!("room {text:?} is not JSON: {e}")))?;
            let room = herald_protocol::Room::from_json(&value)
                .map_err(|e| Status::invalid_argument(format!("room {text:?}: {e}")))?;
            Ok(room.canonical_json())
        })
        .collect()
}

/// What openraft's write errors mean to a caller.
fn write_status(error: RaftError<NodeId, ClientWriteError<NodeId, RegistryNode>>) -> Status {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            leader_hint(forward.leader_node.as_ref().map(|n| n.addr.as_str()))
        }
        // Another change is still being committed: try again shortly.
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(e),
        )) => Status::unavailable(e.to_string()),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::EmptyMembership(e),
        )) => Status::invalid_argument(e.to_string()),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::LearnerNotFound(e),
        )) => Status::failed_precondition(format!("{e}: add it as a learner first")),
        RaftError::Fatal(e) => Status::unavailable(format!("registry member stopped: {e}")),
    }
}

/// "Not the leader": `FAILED_PRECONDITION` naming the leader when its address is known, else `UNAVAILABLE` (an
/// election is under way; retry).
fn leader_hint(leader_addr: Option<&str>) -> Status {
    match leader_addr.and_then(|addr| MetadataValue::try_from(addr).ok().map(|v| (addr, v))) {
        Some((addr, value)) => {
            let mut status = Status::failed_precondition(format!(
                "not the registry leader; the leader is {addr}"
            ));
            status.metadata_mut().insert(LEADER_HEADER, value);
            status
        }
        None => Status::unavailable("no registry leader is known yet"),
    }
}

impl RegistryService {
    /// One interest update from an edge, through the leader's batcher: the unary call and the stream share it.
    async fn interest(&self, request: pb::InterestRequest) -> Result<pb::InterestReply, Status> {
        let pb::InterestRequest { edge, add, remove } = request;
        validate_edge(&edge)?;
        let add = canonical_rooms(add)?;
        let remove = canonical_rooms(remove)?;
        self.ensure_leader()?;
        if add.is_empty() && remove.is_empty() {
            // Nothing to commit; still tell the edge whether it is known.
            let (known, revision) = self
                .core
                .state
                .read_state(|s| (s.edges.contains_key(&edge), s.revision));
            return Ok(pb::InterestReply {
                revision,
                unknown_edge: !known,
            });
        }
        let outcome = self
            .core
            .batcher
            .submit(InterestChange {
                edge: edge.clone(),
                add,
                remove,
            })
            .await;
        match outcome {
            BatchOutcome::Committed(revision) => Ok(pb::InterestReply {
                revision,
                unknown_edge: false,
            }),
            BatchOutcome::UnknownEdge => Ok(pb::InterestReply {
                revision: 0,
                unknown_edge: true,
            }),
            BatchOutcome::Failed(reason) => {
                // Most likely leadership moved while the batch was in flight: send the caller to the new leader.
                self.ensure_leader()?;
                tracing::warn!(node_id = self.core.id, edge = %edge, reason = %reason, "interest update failed");
                Err(Status::unavailable(format!(
                    "interest update not committed: {reason}"
                )))
            }
        }
    }

    /// Ok when this member leads; otherwise the status that sends the caller to the leader.
    fn ensure_leader(&self) -> Result<(), Status> {
        let metrics = self.core.raft.metrics();
        let m = metrics.borrow();
        if m.state == ServerState::Leader && m.current_leader == Some(self.core.id) {
            return Ok(());
        }
        let addr = m
            .current_leader
            .filter(|id| *id != self.core.id)
            .and_then(|id| m.membership_config.membership().get_node(&id))
            .map(|node| node.addr.clone());
        Err(leader_hint(addr.as_deref()))
    }

    /// Writes a change to the route table; a change the apply refused is `INVALID_ARGUMENT` with its reason
    /// (`FAILED_PRECONDITION` for an endpoint still in use).
    async fn table_write(
        &self,
        request: LogRequest,
        parent: Option<Parent>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        self.ensure_leader()?;
        let written = self.write(request, parent.as_ref()).await?;
        if let Some(refused) = written.data.refused {
            return Err(if refused.contains("is used by route") {
                Status::failed_precondition(refused)
            } else {
                Status::invalid_argument(refused)
            });
        }
        Ok(Response::new(pb::WriteReply {
            revision: written.data.revision,
            changed: written.data.changed,
        }))
    }

    /// Proposes `request` and waits for it to be applied; a span `registry.write <kind>` (continuing the
    /// caller's `traceparent` metadata, `parent`) covers it when traces are exported.
    async fn write(
        &self,
        request: LogRequest,
        parent: Option<&Parent>,
    ) -> Result<openraft::raft::ClientWriteResponse<TypeConfig>, Status> {
        let span = write_span(request.kind(), parent);
        let proposed = std::time::Instant::now();
        let written = self
            .core
            .raft
            .client_write(request)
            .instrument(span.clone())
            .await
            .map_err(write_status)?;
        self.core
            .metrics
            .commit_duration
            .observe(proposed.elapsed());
        span.record("herald.registry.revision", written.log_id.index);
        Ok(written)
    }
}

#[tonic::async_trait]
impl RegistryInternal for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let pb::RegisterRequest {
            edge,
            peer_addr,
            ttl_ms,
            rooms,
        } = request.into_inner();
        validate_edge(&edge)?;
        validate_host_port(&peer_addr)
            .map_err(|e| Status::invalid_argument(format!("peer_addr {peer_addr:?}: {e}")))?;
        if ttl_ms == 0 || ttl_ms > MAX_LEASE_TTL.as_millis() as u64 {
            return Err(Status::invalid_argument(format!(
                "ttl_ms must be between 1 and {}",
                MAX_LEASE_TTL.as_millis()
            )));
        }
        let rooms = canonical_rooms(rooms)?;
        self.ensure_leader()?;

        let registered = {
            // Shared with other registrations, exclusive with a lease sweep (see `Core::edge_writes`).
            let _shared = self.core.edge_writes.read().await;
            let written = self
                .write(
                    LogRequest::RegisterEdge {
                        edge: edge.clone(),
                        peer_addr: peer_addr.clone(),
                        ttl_ms,
                    },
                    parent.as_ref(),
                )
                .await?;
            // After the commit was applied, so a new leader's lease restart either saw the edge or runs before this.
            self.core.leases.lock().table.grant(
                edge.clone(),
                Duration::from_millis(ttl_ms),
                Instant::now(),
            );
            written.data.revision
        };

        // The full interest, in entries of bounded size; the lease already runs, so keep-alives work meanwhile.
        let mut revision = registered;
        for chunk in rooms.chunks(MAX_BATCH_CHANGES) {
            let written = self
                .write(
                    LogRequest::Interest {
                        changes: vec![InterestChange {
                            edge: edge.clone(),
                            add: chunk.to_vec(),
                            remove: vec![],
                        }]
                        .into(),
                    },
                    parent.as_ref(),
                )
                .await?;
            if !written.data.unknown_edges.is_empty() {
                // Removed between the two writes (its lease cannot have expired this fast, so another
                // registration or an operator did it): the caller starts over.
                return Err(Status::aborted(
                    "the edge was removed while registering; register again",
                ));
            }
            revision = written.data.revision;
        }
        tracing::info!(
            node_id = self.core.id,
            edge = %edge,
            peer_addr = %peer_addr,
            ttl_ms,
            rooms = rooms.len(),
            revision,
            "edge registered"
        );
        Ok(Response::new(pb::RegisterReply { revision }))
    }

    async fn keep_alive(
        &self,
        request: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::KeepAliveReply>, Status> {
        let edge = request.into_inner().edge;
        validate_edge(&edge)?;
        self.ensure_leader()?;
        let now = Instant::now();
        let mut leases = self.core.leases.lock();
        if leases.term.is_none() {
            // A new leader still catching up before loading the leases: the edge retries, it has not expired.
            return Err(Status::unavailable(
                "the registry leader is still loading leases",
            ));
        }
        let ttl = self
            .core
            .state
            .read_state(|s| s.edges.get(&edge).map(|record| record.ttl_ms));
        // An expired lease is not revived even if its removal has not committed yet: that removal is coming,
        // and the edge must register again after it.
        let renewed = match (ttl, leases.table.age(&edge, now)) {
            (Some(ttl_ms), Some(age)) if age <= Duration::from_millis(ttl_ms) => {
                leases.table.keep_alive(&edge, now)
            }
            _ => false,
        };
        drop(leases);
        if !renewed {
            tracing::debug!(node_id = self.core.id, edge = %edge, "keep-alive from an edge without a lease");
        }
        Ok(Response::new(pb::KeepAliveReply { unknown: !renewed }))
    }

    async fn update_interest(
        &self,
        request: Request<pb::InterestRequest>,
    ) -> Result<Response<pb::InterestReply>, Status> {
        self.interest(request.into_inner()).await.map(Response::new)
    }

    type InterestStreamStream = ReceiverStream<Result<pb::InterestReply, Status>>;

    async fn interest_stream(
        &self,
        request: Request<Streaming<pb::InterestRequest>>,
    ) -> Result<Response<Self::InterestStreamStream>, Status> {
        self.ensure_leader()?;
        let mut updates = request.into_inner();
        // One reply per request and the edge waits for it, so a short buffer is enough.
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let shutdown = service.core.shutdown.clone();
            loop {
                let update = tokio::select! {
                    update = updates.message() => update,
                    // Ending the stream lets the connection close, so shutdown is not held up; the edge reopens
                    // it on the next leader.
                    _ = shutdown.cancelled() => return,
                };
                let update = match update {
                    Ok(Some(update)) => update,
                    // The edge closed its side, or its connection broke.
                    Ok(None) | Err(_) => return,
                };
                let reply = service.interest(update).await;
                // An error ends the stream: the edge reopens it (on the leader, when this one was not).
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let from = request.into_inner().from_revision;
        let (start, live) = self.core.state.watch((from > 0).then_some(from));
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(stream_watch(
            self.core.state.clone(),
            from,
            start,
            live,
            tx,
            self.core.shutdown.clone(),
            self.core.id,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let m = self.core.metrics();
        let membership = m.membership_config.membership();
        let leader_addr = m
            .current_leader
            .and_then(|id| membership.get_node(&id))
            .map(|node| node.addr.clone())
            .unwrap_or_default();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last_log_index = m.last_log_index;
        let members = membership
            .nodes()
            .map(|(id, node)| {
                // Lag is known only to the leader, from its replication progress to each member.
                let lag = m.replication.as_ref().map(|replication| {
                    if *id == self.core.id {
                        return 0;
                    }
                    let matched = replication
                        .get(id)
                        .copied()
                        .flatten()
                        .map_or(0, |log_id| log_id.index);
                    last_log_index.unwrap_or(0).saturating_sub(matched)
                });
                pb::Member {
                    node_id: *id,
                    addr: node.addr.clone(),
                    voter: voters.contains(id),
                    lag,
                }
            })
            .collect();

        let now = Instant::now();
        let leases = self.core.leases.lock();
        let (edges, revision) = self.core.state.read_state(|s| {
            let mut rooms: HashMap<&str, u64> = HashMap::new();
            for edges in s.interest.values() {
                for edge in edges {
                    *rooms.entry(edge.as_str()).or_default() += 1;
                }
            }
            let edges = s
                .edges
                .iter()
                .map(|(edge, record)| pb::EdgeStatus {
                    edge: edge.clone(),
                    peer_addr: record.peer_addr.clone(),
                    rooms: rooms.get(edge.as_str()).copied().unwrap_or(0),
                    lease_age_ms: leases
                        .term
                        .and_then(|_| leases.table.age(edge, now))
                        .map(|age| age.as_millis() as u64),
                })
                .collect();
            (edges, s.revision)
        });
        drop(leases);

        Ok(Response::new(pb::StatusReply {
            node_id: self.core.id,
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index,
            last_applied: m.last_applied.map(|log_id| log_id.index),
            members,
            edges,
            revision,
        }))
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let pb::AddLearnerRequest { node_id, addr } = request.into_inner();
        validate_host_port(&addr)
            .map_err(|e| Status::invalid_argument(format!("addr {addr:?}: {e}")))?;
        self.ensure_leader()?;
        // Not blocking until the learner caught up: openraft would wait forever for one that never comes up.
        // Callers watch `Status` (its lag) before promoting it.
        let written = self
            .core
            .raft
            .add_learner(node_id, RegistryNode { addr: addr.clone() }, false)
            .await
            .map_err(write_status)?;
        tracing::info!(node_id = self.core.id, learner = node_id, addr = %addr, log_index = written.log_id.index, "learner added");
        Ok(Response::new(pb::MembershipReply {
            log_index: written.log_id.index,
        }))
    }

    async fn change_membership(
        &self,
        request: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let voters: BTreeSet<NodeId> = request.into_inner().voters.into_iter().collect();
        if voters.is_empty() {
            return Err(Status::invalid_argument("the new membership has no voters"));
        }
        self.ensure_leader()?;
        // `retain: false`: a member dropped from the voters leaves the cluster instead of staying a learner.
        let written = self
            .core
            .raft
            .change_membership(voters.clone(), false)
            .await
            .map_err(write_status)?;
        tracing::info!(node_id = self.core.id, voters = ?voters, log_index = written.log_id.index, "membership changed");
        Ok(Response::new(pb::MembershipReply {
            log_index: written.log_id.index,
        }))
    }

    async fn remove_learner(
        &self,
        request: Request<pb::RemoveLearnerRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let node_id = request.into_inner().node_id;
        self.ensure_leader()?;
        let is_voter = {
            let metrics = self.core.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            if membership.get_node(&node_id).is_none() {
                return Err(Status::not_found(format!("node {node_id} is not a member")));
            }
            membership.voter_ids().any(|id| id == node_id)
        };
        if is_voter {
            return Err(Status::failed_precondition(format!(
                "node {node_id} is a voter: change the voters to remove it"
            )));
        }
        let removed = BTreeSet::from([node_id]);
        let written = self
            .core
            .raft
            .change_membership(ChangeMembers::RemoveNodes(removed), false)
            .await
            .map_err(write_status)?;
        tracing::info!(
            node_id = self.core.id,
            learner = node_id,
            log_index = written.log_id.index,
            "learner removed"
        );
        Ok(Response::new(pb::MembershipReply {
            log_index: written.log_id.index,
        }))
    }

    async fn put_endpoint(
        &self,
        request: Request<pb::PutEndpointRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let pb::PutEndpointRequest {
            name,
            endpoint_json,
        } = request.into_inner();
        validate_table_name("endpoint", &name)?;
        let endpoint = parse_definition(&endpoint_json)?;
        self.table_write(LogRequest::PutEndpoint { name, endpoint }, parent)
            .await
    }

    async fn delete_endpoint(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let name = request.into_inner().name;
        validate_table_name("endpoint", &name)?;
        self.table_write(LogRequest::DeleteEndpoint { name }, parent)
            .await
    }

    async fn put_route(
        &self,
        request: Request<pb::PutRouteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let pb::PutRouteRequest { name, route_json } = request.into_inner();
        validate_table_name("route", &name)?;
        let route = parse_definition(&route_json)?;
        self.table_write(LogRequest::PutRoute { name, route }, parent)
            .await
    }

    async fn delete_route(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let name = request.into_inner().name;
        validate_table_name("route", &name)?;
        self.table_write(LogRequest::DeleteRoute { name }, parent)
            .await
    }

    async fn claim_source(
        &self,
        request: Request<pb::ClaimSourceRequest>,
    ) -> Result<Response<pb::ClaimSourceReply>, Status> {
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let pb::ClaimSourceRequest { route, edge } = request.into_inner();
        validate_table_name("route", &route)?;
        validate_edge(&edge)?;
        self.ensure_leader()?;
        // A claim that would change nothing is answered from the applied state, without a raft entry: every
        // edge asks about every unowned source, and most asks lose.
        let held = self.core.state.read_state(|s| {
            s.sources
                .get(&route)
                .filter(|owner| s.edges.contains_key(*owner))
                .map(|owner| (owner.clone(), s.revision))
        });
        if let Some((owner, revision)) = held {
            return Ok(Response::new(pb::ClaimSourceReply {
                revision,
                owner,
                unknown_edge: false,
            }));
        }
        let written = self
            .write(
                LogRequest::ClaimSource {
                    route,
                    edge: edge.clone(),
                },
                parent.as_ref(),
            )
            .await?;
        if let Some(refused) = written.data.refused {
            return Err(Status::failed_precondition(refused));
        }
        Ok(Response::new(pb::ClaimSourceReply {
            revision: written.data.revision,
            unknown_edge: written.data.unknown_edges.contains(&edge),
            owner: written.data.owner.unwrap_or_default(),
        }))
    }

    async fn list_routes(
        &self,
        _request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesReply>, Status> {
        let reply = self.core.state.read_state(|s| pb::ListRoutesReply {
            revision: s.revision,
            endpoints: s
                .endpoints
                .iter()
                .map(|(name, endpoint)| pb::NamedEndpoint {
                    name: name.clone(),
                    endpoint_json: endpoint.clone(),
                })
                .collect(),
            routes: s
                .routes
                .iter()
                .map(|(name, route)| pb::Route {
                    name: name.clone(),
                    route_json: route.clone(),
                })
                .collect(),
            sources: s
                .sources
                .iter()
                .map(|(route, edge)| pb::SourceOwner {
                    route: route.clone(),
                    edge: edge.clone(),
                })
                .collect(),
        });
        Ok(Response::new(reply))
    }
}

/// Sends the catch-up, then live events, to one watcher until it goes away or the member shuts down.
///
/// Events at or below what the watcher already has are skipped (see [`StateMachineStore::watch`]). If the
/// live feed overflows for this watcher it is never skipped over: the watcher resumes from its last revision
/// out of the event ring, or with a fresh snapshot when the ring no longer reaches back that far.
async fn stream_watch(
    state: StateMachineStore,
    from: u64,
    start: WatchStart,
    mut live: broadcast::Receiver<WatchEvent>,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    shutdown: tokio_util::sync::CancellationToken,
    node_id: NodeId,
) {
    let mut last = from;
    let mut start = Some(start);
    loop {
        if let Some(start) = start.take() {
            let catch_up = match start {
                WatchStart::Snapshot(snapshot) => {
                    last = snapshot.revision;
                    vec![snapshot_to_proto(snapshot.revision, &snapshot.as_changes())]
                }
                WatchStart::Events(events) => {
                    // Revisions increase from event to event, so the last one sent is the highest.
                    let after = last;
                    let fresh: Vec<_> = events
                        .iter()
                        .filter(|event| event.revision > after)
                        .map(event_to_proto)
                        .collect();
                    if let Some(newest) = fresh.last() {
                        last = newest.revision;
                    }
                    fresh
                }
            };
            for event in catch_up {
                if !send(&tx, event, &shutdown).await {
                    return;
                }
            }
        }
        let received = tokio::select! {
            // Ending the stream lets the connection close, so the member's shutdown is not held up; the watcher
            // resumes from its revision on another member.
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            received = live.recv() => received,
        };
        match received {
            Ok(event) if event.revision > last => {
                last = event.revision;
                if !send(&tx, event_to_proto(&event), &shutdown).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    node_id,
                    revision = last,
                    missed,
                    "watcher fell behind the live feed; resuming it from its revision"
                );
                let (resume, receiver) = state.watch(Some(last));
                live = receiver;
                start = Some(resume);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends one event; false when the watcher is gone or the member is shutting down.
async fn send(
    tx: &mpsc::Sender<Result<pb::WatchEvent, Status>>,
    event: pb::WatchEvent,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        sent = tx.send(Ok(event)) => sent.is_ok(),
    }
}

/// The span of one registry write, when traces are exported: a server span continuing the caller's context.
pub(crate) fn write_span(kind: &'static str, parent: Option<&Parent>) -> tracing::Span {
    if !herald_telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: "herald::registry",
        "registry.write",
        otel.name = format!("registry.write {kind}"),
        otel.kind = "server",
        herald.registry.operation = kind,
        herald.registry.revision = tracing::field::Empty,
        herald.registry.updates = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    herald_telemetry::continue_trace(&span, parent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_host_and_port() {
        for good in ["127.0.0.1:7000", "edge-1.internal:443", "[::1]:9"] {
            assert!(validate_host_port(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:99999",
            "http://host:1",
            "user@host:1",
            "host:1/path",
            "a b:1",
        ] {
            assert!(validate_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rooms_are_canonicalized_and_bad_ones_refused() {
        assert_eq!(
            canonical_rooms(vec![r#"{ "b": 1, "a": "x" }"#.into()]).unwrap(),
            vec![r#"{"a":"x","b":1}"#.to_string()]
        );
        for bad in ["nope", "[1]", r#"{"a":{"b":1}}"#] {
            let status = canonical_rooms(vec![bad.into()]).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    mod lagging_watchers {
        use super::*;
        use crate::store::StoreOptions;
        use openraft::storage::RaftStateMachine;
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

        fn setting(index: u64) -> Entry<TypeConfig> {
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
                payload: EntryPayload::Normal(LogRequest::PutSetting {
                    key: format!("k{index}"),
                    value: "v".into(),
                }),
            }
        }

        /// A watcher whose live receiver overflowed before it read anything, over a store keeping `ring` events.
        async fn overflowed_watch(ring: usize) -> Vec<pb::WatchEvent> {
            let dir = tempfile::tempdir().unwrap();
            let options = StoreOptions {
                event_ring: ring,
                event_channel: 2,
                ..Default::default()
            };
            let mut sm = StateMachineStore::open_with(dir.path(), &options).unwrap();
            sm.apply([setting(1)]).await.unwrap();
            let (start, live) = sm.watch(Some(1));
            sm.apply((2..=6).map(setting)).await.unwrap();

            let (tx, mut rx) = mpsc::channel(WATCH_BUFFER);
            let shutdown = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(stream_watch(
                sm.clone(),
                1,
                start,
                live,
                tx,
                shutdown.clone(),
                1,
            ));
            let mut received = Vec::new();
            while received
                .last()
                .is_none_or(|e: &pb::WatchEvent| e.revision < 6)
            {
                received.push(rx.recv().await.unwrap().unwrap());
            }
            shutdown.cancel();
            task.await.unwrap();
            received
        }

        #[tokio::test]
        async fn resume_from_the_ring_without_a_gap() {
            let revisions: Vec<(u64, bool)> = overflowed_watch(100)
                .await
                .iter()
                .map(|e| (e.revision, e.snapshot))
                .collect();
            assert_eq!(
                revisions,
                [(2, false), (3, false), (4, false), (5, false), (6, false)]
            );
        }

        #[tokio::test]
        async fn get_a_fresh_snapshot_when_the_ring_is_too_short() {
            let received = overflowed_watch(0).await;
            assert_eq!(received.len(), 1, "{received:?}");
            assert!(received[0].snapshot);
            assert_eq!(received[0].revision, 6);
            assert_eq!(received[0].changes.len(), 6, "every setting, from empty");
        }
    }

    #[test]
    fn the_leader_hint_travels_in_metadata() {
        let status = leader_hint(Some("10.0.0.1:7100"));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status
                .metadata()
                .get(LEADER_HEADER)
                .unwrap()
                .to_str()
                .unwrap(),
            "10.0.0.1:7100"
        );
        assert_eq!(leader_hint(None).code(), tonic::Code::Unavailable);
    }
}
