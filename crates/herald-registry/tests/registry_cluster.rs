//! Registry members end to end, in one process: real tonic servers on loopback ports, durable stores in temp
//! directories, and the [`RegistryClient`] edges and `herald ctl` use.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::Code;

use herald_proto::v1 as pb;
use herald_proto::v1::registry_internal_client::RegistryInternalClient;
use herald_registry::grpc::{CLUSTER_SECRET_HEADER, LEADER_HEADER};
use herald_registry::{
    Change, ClusterSecret, InterestOutcome, KeepAliveOutcome, NodeId, RegistryClient,
    RegistryConfig, RegistryHandle, WatchStream, WatchUpdate,
};

const SECRET: &str = "registry-cluster-test-secret";

/// Every test's budget: far above what loopback needs, but a hang fails instead of stalling CI.
const TEST_BUDGET: Duration = Duration::from_secs(90);

/// How long any single wait may take.
const WAIT: Duration = Duration::from_secs(15);

const LOBBY: &str = r#"{"chat":"lobby"}"#;

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

fn secret() -> ClusterSecret {
    ClusterSecret::new(SECRET).unwrap()
}

/// Binds `addr`, retrying briefly: a member restarted on its old port may find it still closing.
async fn bind(addr: &str) -> TcpListener {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

/// A cluster under test: its members' fixed addresses and data directories, and the running ones.
struct Cluster {
    addrs: BTreeMap<NodeId, String>,
    dirs: BTreeMap<NodeId, TempDir>,
    running: BTreeMap<NodeId, RegistryHandle>,
    /// The bootstrap list every member of the first cohort was started with.
    peers: BTreeMap<NodeId, String>,
}

impl Cluster {
    /// `n` members with ids 1..=n, started with the same peer list.
    async fn start(n: u64) -> Cluster {
        let mut listeners = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let listener = bind("127.0.0.1:0").await;
            addrs.insert(id, listener.local_addr().unwrap().to_string());
            listeners.insert(id, listener);
        }
        let mut cluster = Cluster {
            peers: addrs.clone(),
            addrs,
            dirs: BTreeMap::new(),
            running: BTreeMap::new(),
        };
        for (id, listener) in listeners {
            cluster.dirs.insert(id, tempfile::tempdir().unwrap());
            cluster.launch(id, listener).await;
        }
        cluster
    }

    fn config(&self, id: NodeId) -> RegistryConfig {
        let mut config =
            RegistryConfig::new(id, self.addrs[&id].clone(), self.dirs[&id].path(), secret())
                .with_peers(self.peers.clone());
        // Quick sweeps so lease expiry is observable within a test.
        config.lease_sweep = Duration::from_millis(100);
        config
    }

    async fn launch(&mut self, id: NodeId, listener: TcpListener) {
        let handle = herald_registry::start(self.config(id), listener)
            .await
            .unwrap();
        self.running.insert(id, handle);
    }

    /// Restarts a stopped member on its old address, from its data directory.
    async fn restart(&mut self, id: NodeId) {
        let listener = bind(&self.addrs[&id].clone()).await;
        self.launch(id, listener).await;
    }

    /// Starts a new member that is not in the bootstrap list's cohort (it joins through add-learner).
    async fn add_member(&mut self, id: NodeId) {
        let listener = bind("127.0.0.1:0").await;
        self.addrs
            .insert(id, listener.local_addr().unwrap().to_string());
        self.dirs.insert(id, tempfile::tempdir().unwrap());
        // It lists the running members and itself; not the smallest id, so it never initializes a cluster.
        self.peers.insert(id, self.addrs[&id].clone());
        self.launch(id, listener).await;
    }

    async fn stop(&mut self, id: NodeId) {
        let handle = self.running.remove(&id).expect("member is running");
        tokio::time::timeout(WAIT, handle.shutdown())
            .await
            .expect("shutdown is bounded")
            .unwrap();
    }

    async fn stop_all(&mut self) {
        let ids: Vec<NodeId> = self.running.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }

    fn member(&self, id: NodeId) -> &RegistryHandle {
        &self.running[&id]
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(self.addrs.values().cloned().collect(), secret()).unwrap()
    }

    /// A client that only knows member `id` (writes still reach the leader through its hints).
    fn client_of(&self, id: NodeId) -> RegistryClient {
        RegistryClient::new(vec![self.addrs[&id].clone()], secret()).unwrap()
    }

    /// Waits until the running members agree on a leader that knows it leads, and returns it.
    async fn leader(&self) -> NodeId {
        let deadline = Instant::now() + WAIT;
        loop {
            let leaders: BTreeSet<Option<NodeId>> = self
                .running
                .values()
                .map(|m| m.metrics().borrow().current_leader)
                .collect();
            if let [Some(leader)] = leaders.into_iter().collect::<Vec<_>>()[..] {
                if self.running.get(&leader).is_some_and(|m| m.is_leader()) {
                    return leader;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader elected within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn followers(&self, leader: NodeId) -> Vec<NodeId> {
        self.running
            .keys()
            .copied()
            .filter(|id| *id != leader)
            .collect()
    }

    /// Waits until every running member applied log index `index`.
    async fn applied_everywhere(&self, index: u64) {
        for m in self.running.values() {
            m.raft()
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), "applied everywhere")
                .await
                .unwrap();
        }
    }
}

/// A watcher's replica, rebuilt from the updates as an edge would.
#[derive(Debug, Default, PartialEq, Eq)]
struct Replica {
    revision: u64,
    edges: BTreeMap<String, String>,
    interest: BTreeMap<String, BTreeSet<String>>,
}

impl Replica {
    fn apply(&mut self, update: &WatchUpdate) {
        if update.snapshot {
            *self = Replica::default();
        }
        assert!(
            update.revision >= self.revision,
            "revisions never go backwards"
        );
        for change in &update.changes {
            match change {
                Change::EdgeUp { edge, peer_addr } => {
                    self.edges.insert(edge.clone(), peer_addr.clone());
                }
                Change::EdgeDown { edge } => {
                    self.edges.remove(edge);
                    self.interest.retain(|_, edges| {
                        edges.remove(edge);
                        !edges.is_empty()
                    });
                }
                Change::InterestAdded { room, edge } => {
                    self.interest
                        .entry(room.clone())
                        .or_default()
                        .insert(edge.clone());
                }
                Change::InterestRemoved { room, edge } => {
                    if let Some(edges) = self.interest.get_mut(room) {
                        edges.remove(edge);
                        if edges.is_empty() {
                            self.interest.remove(room);
                        }
                    }
                }
                _ => {}
            }
        }
        self.revision = update.revision;
    }

    fn rooms_of(&self, edge: &str) -> BTreeSet<String> {
        self.interest
            .iter()
            .filter(|(_, edges)| edges.contains(edge))
            .map(|(room, _)| room.clone())
            .collect()
    }
}

async fn next_update(stream: &mut WatchStream) -> WatchUpdate {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch update within the wait")
        .expect("the watch stream is open")
        .expect("the watch stream carries no error")
}

/// Applies updates until `done` holds for the replica; returns every update seen.
async fn watch_until(
    stream: &mut WatchStream,
    replica: &mut Replica,
    done: impl Fn(&Replica) -> bool,
) -> Vec<WatchUpdate> {
    let mut seen = Vec::new();
    while !done(replica) {
        let update = next_update(stream).await;
        replica.apply(&update);
        seen.push(update);
    }
    seen
}

fn rooms(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A raw registry client for one member, presenting `secret`, to see exact statuses and metadata.
async fn raw_client(
    addr: &str,
) -> RegistryInternalClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    RegistryInternalClient::with_interceptor(channel, |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, MetadataValue::from_static(SECRET));
        Ok(request)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_watcher_sees_the_snapshot_then_the_deltas() {
    bounded(async {
        let mut cluster = Cluster::start(3).await;
        let leader = cluster.leader().await;
        let follower = cluster.followers(leader)[0];
        let client = cluster.client();

        // Rooms arrive in any spelling and are stored canonically.
        let registered = client
            .register(
                "edge-a",
                "127.0.0.1:9001",
                Duration::from_secs(30),
                vec![r#"{ "chat" : "lobby" }"#.into()],
            )
            .await
            .unwrap();
        assert_eq!(client.leader().as_deref(), Some(&*cluster.addrs[&leader]));
        cluster.applied_everywhere(registered).await;

        let mut watch = cluster.client_of(follower).watch(0).await.unwrap();
        assert_eq!(watch.member(), cluster.addrs[&follower]);
        let first = next_update(&mut watch).await;
        assert!(first.snapshot, "a new watcher starts with a snapshot");
        assert_eq!(first.revision, registered);
        let mut replica = Replica::default();
        replica.apply(&first);
        assert_eq!(replica.edges["edge-a"], "127.0.0.1:9001");
        assert_eq!(replica.rooms_of("edge-a"), rooms(&[LOBBY]));

        let updated = client
            .update_interest(
                "edge-a",
                vec![r#"{"chat":"x","org":7}"#.into()],
                vec![LOBBY.into()],
            )
            .await
            .unwrap();
        let InterestOutcome::Committed(revision) = updated else {
            panic!("{updated:?}")
        };
        let deltas = watch_until(&mut watch, &mut replica, |r| r.revision >= revision).await;
        assert!(deltas.iter().all(|u| !u.snapshot), "then only deltas");
        assert_eq!(
            replica.rooms_of("edge-a"),
            rooms(&[r#"{"chat":"x","org":7}"#])
        );

        // Through a client that knows only a follower: the write follows the leader hint.
        let via_follower = cluster.client_of(follower);
        assert_eq!(
            via_follower.keep_alive("edge-a").await.unwrap(),
            KeepAliveOutcome::Renewed
        );
        assert_eq!(
            via_follower.leader().as_deref(),
            Some(&*cluster.addrs[&leader])
        );
        assert_eq!(
            client.keep_alive("ghost").await.unwrap(),
            KeepAliveOutcome::UnknownEdge
        );
        assert_eq!(
            client
                .update_interest("ghost", vec![LOBBY.into()], vec![])
                .await
                .unwrap(),
            InterestOutcome::UnknownEdge
        );

        // A follower refuses writes itself, naming the leader.
        let mut raw = raw_client(&cluster.addrs[&follower]).await;
        let refused = raw
            .keep_alive(pb::KeepAliveRequest {
                edge: "edge-a".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(
            refused
                .metadata()
                .get(LEADER_HEADER)
                .unwrap()
                .to_str()
                .unwrap(),
            cluster.addrs[&leader]
        );

        // Bad input never reaches the log.
        for (edge, peer, room) in [
            ("", "127.0.0.1:1", LOBBY),
            (&*"e".repeat(129), "127.0.0.1:1", LOBBY),
            ("edge-b", "no-port", LOBBY),
            ("edge-b", "127.0.0.1:1", "not json"),
            ("edge-b", "127.0.0.1:1", r#"{"nested":{"a":1}}"#),
        ] {
            let error = client
                .register(edge, peer, Duration::from_secs(3), vec![room.into()])
                .await
                .unwrap_err();
            assert_eq!(
                error.code(),
                Code::InvalidArgument,
                "{edge:?} {peer:?} {room:?}"
            );
        }

        // Status from the leader: members, the edge with its room count and lease age.
        let status = client.status().await.unwrap();
        assert_eq!(status.node_id, leader);
        assert_eq!(status.leader_id, Some(leader));
        assert_eq!(status.leader_addr, cluster.addrs[&leader]);
        assert_eq!(status.members.len(), 3);
        assert!(status.members.iter().all(|m| m.voter && m.lag.is_some()));
        assert_eq!(status.edges.len(), 1);
        assert_eq!(status.edges[0].edge, "edge-a");
        assert_eq!(status.edges[0].rooms, 1);
        assert!(status.edges[0].lease_age_ms.is_some());
        assert_eq!(status.revision, revision);
        // A follower's own view: same leader, no lease ages.
        let own = client
            .member_status(&cluster.addrs[&follower])
            .await
            .unwrap();
        assert_eq!(own.node_id, follower);
        assert_eq!(own.leader_id, Some(leader));
        assert!(own.edges.iter().all(|e| e.lease_age_ms.is_none()));

        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_edge_is_removed_after_its_lease() {
    bounded(async {
        let mut cluster = Cluster::start(3).await;
        cluster.leader().await;
        let client = cluster.client();
        let ttl = Duration::from_millis(600);

        client
            .register("alive", "127.0.0.1:9001", ttl, vec![LOBBY.into()])
            .await
            .unwrap();
        let silent = client
            .register("silent", "127.0.0.1:9002", ttl, vec![LOBBY.into()])
            .await
            .unwrap();
        let registered_at = Instant::now();

        // The live edge keeps its lease alive three times per TTL.
        let keeper = {
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    assert_eq!(
                        client.keep_alive("alive").await.unwrap(),
                        KeepAliveOutcome::Renewed
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };

        let mut watch = client.watch(silent).await.unwrap();
        let mut replica = Replica {
            revision: silent,
            edges: [
                ("alive".to_string(), "127.0.0.1:9001".to_string()),
                ("silent".to_string(), "127.0.0.1:9002".to_string()),
            ]
            .into(),
            interest: [(LOBBY.to_string(), rooms(&["alive", "silent"]))].into(),
        };
        let updates = watch_until(&mut watch, &mut replica, |r| {
            !r.edges.contains_key("silent")
        })
        .await;
        let removed_after = registered_at.elapsed();
        assert!(updates.iter().flat_map(|u| &u.changes).any(|c| *c
            == Change::EdgeDown {
                edge: "silent".into()
            }));
        // TTL plus a sweep, plus slack for a loaded machine.
        assert!(
            removed_after < ttl + Duration::from_millis(100) + Duration::from_secs(2),
            "removed after {removed_after:?}"
        );
        assert!(
            removed_after >= ttl,
            "not before its TTL: {removed_after:?}"
        );
        assert_eq!(replica.interest[LOBBY], rooms(&["alive"]));

        // The expired edge must register again.
        assert_eq!(
            client.keep_alive("silent").await.unwrap(),
            KeepAliveOutcome::UnknownEdge
        );
        // Well past the TTL, the live one is still there.
        tokio::time::sleep(ttl * 2).await;
        assert!(!keeper.is_finished(), "keep-alives kept succeeding");
        keeper.abort();
        let status = client.status().await.unwrap();
        let edges: Vec<&str> = status.edges.iter().map(|e| e.edge.as_str()).collect();
        assert_eq!(edges, ["alive"]);

        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_keep_working_when_the_leader_is_killed() {
    bounded(async {
        let mut cluster = Cluster::start(3).await;
        let old_leader = cluster.leader().await;
        let client = cluster.client();

        client
            .register(
                "edge-a",
                "127.0.0.1:9001",
                Duration::from_secs(30),
                vec![LOBBY.into()],
            )
            .await
            .unwrap();
        let before = client
            .update_interest("edge-a", vec![r#"{"chat":"before"}"#.into()], vec![])
            .await
            .unwrap();
        assert!(matches!(before, InterestOutcome::Committed(_)));
        assert_eq!(
            client.leader().as_deref(),
            Some(&*cluster.addrs[&old_leader])
        );

        let killed = Instant::now();
        cluster.stop(old_leader).await;

        // The client still points at the dead leader: it must find the new one by itself.
        let after = client
            .update_interest("edge-a", vec![r#"{"chat":"after"}"#.into()], vec![])
            .await
            .unwrap();
        let InterestOutcome::Committed(revision) = after else {
            panic!("{after:?}")
        };
        let recovered = killed.elapsed();
        eprintln!("writes resumed {recovered:?} after the leader stopped");
        let new_leader = cluster.leader().await;
        assert_ne!(new_leader, old_leader);
        assert_eq!(
            client.leader().as_deref(),
            Some(&*cluster.addrs[&new_leader])
        );
        assert!(
            recovered < Duration::from_secs(5),
            "writes resumed after {recovered:?}"
        );

        // The new leader restarted the lease in full: the edge is still alive.
        assert_eq!(
            client.keep_alive("edge-a").await.unwrap(),
            KeepAliveOutcome::Renewed
        );
        cluster.applied_everywhere(revision).await;
        for m in cluster.running.values() {
            let state = m.state_machine().state();
            assert_eq!(state.edges["edge-a"].peer_addr, "127.0.0.1:9001");
            let held: BTreeSet<String> = state
                .interest
                .iter()
                .filter(|(_, edges)| edges.contains("edge-a"))
                .map(|(room, _)| room.clone())
                .collect();
            assert_eq!(
                held,
                rooms(&[LOBBY, r#"{"chat":"before"}"#, r#"{"chat":"after"}"#])
            );
        }

        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_registry_restarted_from_disk_keeps_its_state() {
    bounded(async {
        let mut cluster = Cluster::start(3).await;
        cluster.leader().await;
        let client = cluster.client();
        for (edge, room) in [("edge-a", LOBBY), ("edge-b", r#"{"chat":"b"}"#)] {
            client
                .register(
                    edge,
                    "127.0.0.1:9001",
                    Duration::from_secs(60),
                    vec![room.into()],
                )
                .await
                .unwrap();
        }
        let last = client
            .update_interest("edge-b", vec![LOBBY.into()], vec![])
            .await
            .unwrap();
        let InterestOutcome::Committed(last) = last else {
            panic!("{last:?}")
        };
        cluster.applied_everywhere(last).await;
        let before = cluster.member(1).state_machine().state();

        cluster.stop_all().await;
        for id in 1..=3 {
            cluster.restart(id).await;
        }
        cluster.leader().await;
        cluster.applied_everywhere(last).await;
        for m in cluster.running.values() {
            let state = m.state_machine().state();
            assert_eq!(state.edges, before.edges, "member {}", m.node_id());
            assert_eq!(state.interest, before.interest, "member {}", m.node_id());
            assert_eq!(
                state.interest[LOBBY],
                rooms(&["edge-a", "edge-b"]),
                "member {}",
                m.node_id()
            );
        }
        // And it takes writes again, with the old leases restored by the new leader.
        assert_eq!(
            cluster.client().keep_alive("edge-a").await.unwrap(),
            KeepAliveOutcome::Renewed
        );
        // A watcher resuming from its revision gets what came after, with no snapshot.
        let more = cluster
            .client()
            .update_interest("edge-a", vec![r#"{"chat":"new"}"#.into()], vec![])
            .await
            .unwrap();
        assert!(matches!(more, InterestOutcome::Committed(_)));
        let mut watch = cluster.client().watch(last).await.unwrap();
        let update = next_update(&mut watch).await;
        assert!(!update.snapshot);
        assert!(update.revision > last);

        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_without_the_right_secret_are_refused() {
    bounded(async {
        // A one-member registry (as `herald dev` runs it), through `run`.
        let dir = tempfile::tempdir().unwrap();
        let listener = bind("127.0.0.1:0").await;
        let addr = listener.local_addr().unwrap().to_string();
        let config = RegistryConfig::new(1, addr.clone(), dir.path(), secret());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(herald_registry::run(config, listener, None, async {
            let _ = stopped.await;
        }));

        let right = RegistryClient::new(vec![addr.clone()], secret()).unwrap();
        right
            .register("edge-a", "127.0.0.1:9001", Duration::from_secs(30), vec![])
            .await
            .unwrap();

        let wrong = RegistryClient::new(
            vec![addr.clone()],
            ClusterSecret::new("not-the-secret").unwrap(),
        )
        .unwrap();
        assert_eq!(
            wrong.status().await.unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            wrong
                .register("edge-b", "127.0.0.1:9001", Duration::from_secs(30), vec![])
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
        assert_eq!(
            wrong.watch(0).await.unwrap_err().code(),
            Code::Unauthenticated
        );

        // No secret at all.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let refused = RegistryInternalClient::new(channel)
            .status(pb::StatusRequest {})
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);

        let status = right.status().await.unwrap();
        assert_eq!(
            status.edges.len(),
            1,
            "nothing the refused calls sent was applied"
        );

        let _ = stop.send(());
        tokio::time::timeout(WAIT, running)
            .await
            .expect("run returns after its shutdown signal")
            .unwrap()
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_is_added_promoted_and_another_removed() {
    bounded(async {
        let mut cluster = Cluster::start(3).await;
        let leader = cluster.leader().await;
        let client = cluster.client();
        let registered = client
            .register(
                "edge-a",
                "127.0.0.1:9001",
                Duration::from_secs(60),
                vec![LOBBY.into()],
            )
            .await
            .unwrap();

        cluster.add_member(4).await;
        let learner_at = client.add_learner(4, &cluster.addrs[&4]).await.unwrap();
        assert!(learner_at > registered);
        cluster
            .member(4)
            .raft()
            .wait(Some(WAIT))
            .applied_index_at_least(Some(learner_at), "the learner caught up")
            .await
            .unwrap();
        assert_eq!(
            cluster.member(4).metrics().borrow().state,
            ServerState::Learner
        );
        assert_eq!(
            cluster.member(4).state_machine().state().edges["edge-a"].peer_addr,
            "127.0.0.1:9001",
            "the learner has the state"
        );
        let status = client.status().await.unwrap();
        let learner = status.members.iter().find(|m| m.node_id == 4).unwrap();
        assert!(!learner.voter);

        client
            .change_membership(BTreeSet::from([1, 2, 3, 4]))
            .await
            .unwrap();
        let status = client.status().await.unwrap();
        assert_eq!(status.members.len(), 4);
        assert!(status.members.iter().all(|m| m.voter));

        // Remove a follower: it leaves the membership entirely.
        let removed = cluster
            .followers(leader)
            .into_iter()
            .find(|id| *id != 4)
            .unwrap();
        let voters: BTreeSet<NodeId> = [1, 2, 3, 4]
            .into_iter()
            .filter(|id| *id != removed)
            .collect();
        let changed = client.change_membership(voters.clone()).await.unwrap();
        cluster.stop(removed).await;
        let status = client.status().await.unwrap();
        let members: BTreeSet<NodeId> = status.members.iter().map(|m| m.node_id).collect();
        assert_eq!(members, voters);
        assert!(status.members.iter().all(|m| m.voter));

        // Promoting a member that was never added is refused, not retried forever.
        let error = client
            .change_membership(BTreeSet::from([1, 2, 3, 4, 9]))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{error}");

        // The reshaped cluster still takes writes, and the new voter applies them.
        let more = client
            .update_interest("edge-a", vec![r#"{"chat":"after"}"#.into()], vec![])
            .await
            .unwrap();
        let InterestOutcome::Committed(revision) = more else {
            panic!("{more:?}")
        };
        assert!(revision > changed);
        cluster.applied_everywhere(revision).await;

        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_interest_stream_follows_the_leader_and_survives_its_death() {
    bounded(async {
        let mut cluster = Cluster::start(3).await;
        let old_leader = cluster.leader().await;
        let follower = cluster.followers(old_leader)[0];
        // A client that knows only a follower: the stream must open on the leader through the hint.
        let client = cluster.client_of(follower);
        client
            .register("edge-s", "127.0.0.1:9002", Duration::from_secs(30), vec![])
            .await
            .unwrap();
        let mut updates = client.interest_updates("edge-s");
        for i in 0..20 {
            let outcome = updates
                .update(vec![format!(r#"{{"s":{i}}}"#)], vec![])
                .await
                .unwrap();
            assert!(
                matches!(outcome, InterestOutcome::Committed(_)),
                "{outcome:?}"
            );
        }
        let removed = updates
            .update(vec![], vec![r#"{"s":0}"#.into()])
            .await
            .unwrap();
        assert!(matches!(removed, InterestOutcome::Committed(_)));
        assert_eq!(
            client.leader().as_deref(),
            Some(&*cluster.addrs[&old_leader])
        );

        cluster.stop(old_leader).await;
        // The open stream breaks with its member; the update in flight is retried and the next one reopens the
        // stream on the new leader.
        let after = updates
            .update(vec![r#"{"s":"after"}"#.into()], vec![])
            .await
            .unwrap();
        let InterestOutcome::Committed(revision) = after else {
            panic!("{after:?}")
        };
        let again = updates
            .update(vec![r#"{"s":"again"}"#.into()], vec![])
            .await
            .unwrap();
        let InterestOutcome::Committed(last) = again else {
            panic!("{again:?}")
        };
        assert!(last > revision);
        let new_leader = cluster.leader().await;
        assert_eq!(
            client.leader().as_deref(),
            Some(&*cluster.addrs[&new_leader])
        );

        cluster.applied_everywhere(last).await;
        let mut expected: Vec<String> = (1..20).map(|i| format!(r#"{{"s":{i}}}"#)).collect();
        expected.push(r#"{"s":"after"}"#.into());
        expected.push(r#"{"s":"again"}"#.into());
        let expected: BTreeSet<String> = expected.into_iter().collect();
        for m in cluster.running.values() {
            let held: BTreeSet<String> = m
                .state_machine()
                .state()
                .interest
                .iter()
                .filter(|(_, edges)| edges.contains("edge-s"))
                .map(|(room, _)| room.clone())
                .collect();
            assert_eq!(held, expected);
        }

        // An edge the registry does not know is told so on the stream, as on the call.
        let mut ghost = client.interest_updates("edge-ghost");
        assert_eq!(
            ghost
                .update(vec![r#"{"s":1}"#.into()], vec![])
                .await
                .unwrap(),
            InterestOutcome::UnknownEdge
        );
        cluster.stop_all().await;
    })
    .await;
}
