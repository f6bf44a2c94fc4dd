//! The raft transport end to end: real openraft members in one process, talking over loopback gRPC through
//! [`GrpcNetwork`] and [`raft_server`], with an in-memory store so the test depends only on the network layer.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::RPCError;
use openraft::network::RPCOption;
use openraft::raft::VoteRequest;
use openraft::{Config, Raft, RaftNetwork, RaftNetworkFactory, Vote};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::Code;

use herald_proto::v1::raft_internal_client::RaftInternalClient;
use herald_proto::v1::RaftRequest;
use herald_registry::grpc::{
    raft_server, ClusterSecret, CLUSTER_SECRET_HEADER, DEFAULT_MAX_RAFT_MESSAGE_BYTES,
};
use herald_registry::network::GrpcNetwork;
use herald_registry::{NodeId, RegistryNode, Request, TypeConfig};

use support::mem_store::{MemLog, MemStateMachine};

const SECRET: &str = "test-cluster-secret";

/// Every test's budget: far above what loopback needs, but a hang fails instead of stalling CI.
const TEST_BUDGET: Duration = Duration::from_secs(30);

/// How long any single wait on raft metrics may take.
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

fn config() -> Arc<Config> {
    Arc::new(
        Config {
            cluster_name: "herald-test".into(),
            // Tiny chunks, so a snapshot crosses the network as many InstallSnapshot calls.
            snapshot_max_chunk_size: 64,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    )
}

/// One registry member: raft over the in-memory store, serving its raft service on a loopback port.
struct Member {
    id: NodeId,
    node: RegistryNode,
    raft: Raft<TypeConfig>,
    state_machine: MemStateMachine,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Member {
    async fn start(id: NodeId) -> Member {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = RegistryNode {
            addr: listener.local_addr().unwrap().to_string(),
        };
        let secret = ClusterSecret::new(SECRET).unwrap();
        let state_machine = MemStateMachine::default();
        let raft = Raft::new(
            id,
            config(),
            GrpcNetwork::new(id, secret.clone()),
            MemLog::default(),
            state_machine.clone(),
        )
        .await
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(raft_server(
                    raft.clone(),
                    secret,
                    DEFAULT_MAX_RAFT_MESSAGE_BYTES,
                ))
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Member {
            id,
            node,
            raft,
            state_machine,
            stop,
            server,
        }
    }

    async fn shutdown(self) {
        self.raft.shutdown().await.unwrap();
        let _ = self.stop.send(());
        // Peers' idle HTTP/2 connections can hold a graceful shutdown open; the test need not wait them out (the
        // runtime, and the server task with it, ends with the test).
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
    }
}

/// Three members, initialized as one cluster, with a leader elected.
async fn three_member_cluster() -> (Vec<Member>, NodeId) {
    let mut members = Vec::new();
    for id in 1..=3 {
        members.push(Member::start(id).await);
    }
    let membership: BTreeMap<NodeId, RegistryNode> =
        members.iter().map(|m| (m.id, m.node.clone())).collect();
    members[0].raft.initialize(membership).await.unwrap();

    let metrics = members[0]
        .raft
        .wait(Some(WAIT))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .unwrap();
    let leader = metrics.current_leader.unwrap();
    // The leader itself must know it leads before it takes writes.
    member(&members, leader)
        .raft
        .wait(Some(WAIT))
        .state(openraft::ServerState::Leader, "the leader leads")
        .await
        .unwrap();
    (members, leader)
}

fn member(members: &[Member], id: NodeId) -> &Member {
    members.iter().find(|m| m.id == id).unwrap()
}

fn put_setting(key: &str, value: &str) -> Request {
    Request::PutSetting {
        key: key.into(),
        value: value.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_replicate_a_write_over_grpc() {
    bounded(async {
        let (members, leader) = three_member_cluster().await;

        let written = member(&members, leader)
            .raft
            .client_write(put_setting("motd", "hello"))
            .await
            .unwrap();
        let index = written.log_id.index;
        assert_eq!(written.data.revision, index);

        for m in &members {
            m.raft
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), "the write is applied everywhere")
                .await
                .unwrap();
            assert_eq!(
                m.state_machine
                    .state()
                    .settings
                    .get("motd")
                    .map(String::as_str),
                Some("hello"),
                "member {} applied the setting",
                m.id
            );
        }

        for m in members {
            m.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_member_catches_up_from_a_snapshot_over_grpc() {
    bounded(async {
        let (mut members, leader) = three_member_cluster().await;
        let leader_raft = member(&members, leader).raft.clone();

        let mut last = 0;
        for i in 0..5 {
            last = leader_raft
                .client_write(put_setting(&format!("key-{i}"), "value"))
                .await
                .unwrap()
                .log_id
                .index;
        }
        // Snapshot and drop the log on the leader, so a newcomer can only be brought up by a snapshot.
        leader_raft.trigger().snapshot().await.unwrap();
        let snapshot = leader_raft
            .wait(Some(WAIT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= last),
                "the leader has a snapshot",
            )
            .await
            .unwrap()
            .snapshot
            .unwrap();
        leader_raft
            .trigger()
            .purge_log(snapshot.index)
            .await
            .unwrap();
        leader_raft
            .wait(Some(WAIT))
            .purged(Some(snapshot), "the leader purged its log")
            .await
            .unwrap();

        let newcomer = Member::start(4).await;
        leader_raft
            .add_learner(4, newcomer.node.clone(), true)
            .await
            .unwrap();
        newcomer
            .raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(last), "the newcomer caught up")
            .await
            .unwrap();
        let metrics = newcomer.raft.metrics().borrow().clone();
        assert!(
            metrics.snapshot.is_some_and(|s| s.index >= snapshot.index),
            "the newcomer was brought up by a snapshot: {metrics:?}"
        );
        let settings = newcomer.state_machine.state().settings;
        assert_eq!(settings.len(), 5, "{settings:?}");

        members.push(newcomer);
        for m in members {
            m.shutdown().await;
        }
    })
    .await;
}

fn vote_request() -> VoteRequest<NodeId> {
    VoteRequest::new(Vote::new(1, 9), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_without_the_cluster_secret_are_unauthenticated() {
    bounded(async {
        let target = Member::start(1).await;
        let mut client = RaftInternalClient::connect(format!("http://{}", target.node.addr))
            .await
            .unwrap();
        let body = || RaftRequest {
            data: serde_json::to_vec(&vote_request()).unwrap(),
        };

        // No secret at all.
        let status = client.vote(body()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        // The wrong secret, on every RPC.
        let wrong = || {
            let mut request = tonic::Request::new(body());
            request.metadata_mut().insert(
                CLUSTER_SECRET_HEADER,
                MetadataValue::from_static("not-the-secret"),
            );
            request
        };
        for status in [
            client.vote(wrong()).await.unwrap_err(),
            client.append_entries(wrong()).await.unwrap_err(),
            client.install_snapshot(wrong()).await.unwrap_err(),
        ] {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }

        // The right secret gets through to raft (which answers; voting for an unknown candidate is its business).
        let mut right = tonic::Request::new(body());
        right
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, MetadataValue::from_static(SECRET));
        let reply = client.vote(right).await.unwrap().into_inner();
        assert!(
            reply.error.is_empty() && !reply.data.is_empty(),
            "{reply:?}"
        );

        // And garbage with the right secret is the caller's error, not raft's.
        let mut garbage = tonic::Request::new(RaftRequest {
            data: b"{not json".to_vec(),
        });
        garbage
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, MetadataValue::from_static(SECRET));
        let status = client.vote(garbage).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        target.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_with_the_wrong_secret_cannot_reach_the_others() {
    bounded(async {
        let target = Member::start(1).await;
        let option = RPCOption::new(Duration::from_secs(2));

        // What a misconfigured member's raft would see: unreachable, so openraft backs off rather than retrying.
        let mut outsider = GrpcNetwork::new(9, ClusterSecret::new("wrong-secret").unwrap());
        let mut connection = outsider.new_client(target.id, &target.node).await;
        match connection.vote(vote_request(), option.clone()).await {
            Err(RPCError::Unreachable(e)) => {
                assert!(e.to_string().contains("cluster secret"), "{e}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }

        // The same call with the right secret is answered by the target's raft.
        let mut insider = GrpcNetwork::new(9, ClusterSecret::new(SECRET).unwrap());
        let mut connection = insider.new_client(target.id, &target.node).await;
        connection
            .vote(vote_request(), option.clone())
            .await
            .unwrap();

        target.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn down_or_undialable_members_are_unreachable() {
    bounded(async {
        let option = RPCOption::new(Duration::from_secs(2));
        let mut network = GrpcNetwork::new(1, ClusterSecret::new(SECRET).unwrap());

        // A port nothing listens on any more: the connection is refused.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = RegistryNode {
            addr: listener.local_addr().unwrap().to_string(),
        };
        drop(listener);
        let mut connection = network.new_client(2, &closed).await;
        let result = connection.vote(vote_request(), option.clone()).await;
        assert!(
            matches!(result, Err(RPCError::Unreachable(_))),
            "{result:?}"
        );

        // An address that is not an address at all.
        let bogus = RegistryNode {
            addr: "not an address".into(),
        };
        let mut connection = network.new_client(3, &bogus).await;
        let result = connection.vote(vote_request(), option).await;
        assert!(
            matches!(result, Err(RPCError::Unreachable(_))),
            "{result:?}"
        );
    })
    .await;
}
