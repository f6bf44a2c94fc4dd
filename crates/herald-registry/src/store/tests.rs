//! Tests of the durable store: openraft's storage suite, restarts, torn tails, group commit, the state machine,
//! and a single-node raft restarted from its data directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Config, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, Membership,
    Raft, RaftLogReader, RaftNetwork, RaftNetworkFactory, RaftSnapshotBuilder, ServerState,
    StorageError, Vote,
};
use serde_json::json;
use tempfile::TempDir;

use super::state_machine::diff;
use super::{
    open, open_with, storage_error, LogStore, StateMachineStore, StoreError, StoreOptions,
    WatchEvent, WatchStart,
};
use crate::state::tests::{interest, register};
use crate::state::{Change, RegistryState};
use crate::types::{NodeId, RegistryNode, Request, TypeConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn lid(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Blank,
    }
}

fn normal(term: u64, index: u64, request: Request) -> Entry<TypeConfig> {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Normal(request),
    }
}

fn membership(term: u64, index: u64, voters: &[NodeId]) -> Entry<TypeConfig> {
    let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], None)),
    }
}

fn endpoint(name: &str, definition: serde_json::Value) -> Request {
    Request::PutEndpoint {
        name: name.into(),
        endpoint: definition,
    }
}

fn setting(key: &str, value: &str) -> Request {
    Request::PutSetting {
        key: key.into(),
        value: value.into(),
    }
}

/// Entries 1..=n, each setting a distinct key, in term 1.
fn settings(range: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
    range
        .map(|i| normal(1, i, setting(&format!("k{i}"), &format!("v{i}"))))
        .collect()
}

/// Appends and waits until the entries are durable.
fn append_durably(log: &mut LogStore, entries: Vec<Entry<TypeConfig>>) -> io::Result<()> {
    let (tx, rx) = std_mpsc::channel();
    log.append_with(entries, move |result| {
        let _ = tx.send(result);
    })
    .map_err(io::Error::other)?;
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(io::Error::other)?
}

async fn all_entries(log: &mut LogStore) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
    log.try_get_log_entries(..).await
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Opens both stores in a fresh temporary directory, which lives as long as the test holds the guard.
struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let (log, sm) = open(dir.path())
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Read, &e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), Box<StorageError<NodeId>>> {
    Suite::test_all(TempStoreBuilder).map_err(Box::new)
}

#[tokio::test]
async fn log_vote_committed_truncate_and_purge_survive_restart() -> TestResult {
    let dir = TempDir::new()?;
    let entries = settings(1..=20);
    {
        let mut log = LogStore::open(dir.path())?;
        append_durably(&mut log, entries[..10].to_vec())?;
        append_durably(&mut log, entries[10..].to_vec())?;
        log.save_vote(&Vote::new(3, 7)).await?;
        log.save_committed(Some(lid(1, 15))).await?;
    }
    {
        let mut log = LogStore::open(dir.path())?;
        assert_eq!(all_entries(&mut log).await?, entries);
        assert_eq!(log.read_vote().await?, Some(Vote::new(3, 7)));
        assert_eq!(log.read_committed().await?, Some(lid(1, 15)));
        let state = log.get_log_state().await?;
        assert_eq!(
            (state.last_purged_log_id, state.last_log_id),
            (None, Some(lid(1, 20)))
        );

        log.truncate(lid(1, 18)).await?;
        log.purge(lid(1, 5)).await?;
        assert_eq!(all_entries(&mut log).await?, entries[5..17].to_vec());
    }
    {
        let mut log = LogStore::open(dir.path())?;
        assert_eq!(all_entries(&mut log).await?, entries[5..17].to_vec());
        let state = log.get_log_state().await?;
        assert_eq!(
            (state.last_purged_log_id, state.last_log_id),
            (Some(lid(1, 5)), Some(lid(1, 17)))
        );
        assert_eq!(log.read_vote().await?, Some(Vote::new(3, 7)));
        // The log goes on after the truncation point, in a new term.
        append_durably(&mut log, vec![blank(2, 18)])?;
        // And refuses to leave a hole.
        assert!(matches!(
            log.append_with(vec![blank(2, 20)], |_| {}),
            Err(StoreError::Gap {
                expected: 19,
                got: 20
            })
        ));
    }
    let mut log = LogStore::open(dir.path())?;
    let got = all_entries(&mut log).await?;
    assert_eq!(got.len(), 13);
    assert_eq!(got.last().map(|e| e.log_id), Some(lid(2, 18)));
    Ok(())
}

#[tokio::test]
async fn purging_past_the_end_survives_restart() -> TestResult {
    let dir = TempDir::new()?;
    {
        let mut log = LogStore::open(dir.path())?;
        append_durably(&mut log, settings(1..=3))?;
        log.purge(lid(1, 10)).await?;
    }
    let mut log = LogStore::open(dir.path())?;
    let state = log.get_log_state().await?;
    assert_eq!(
        (state.last_purged_log_id, state.last_log_id),
        (Some(lid(1, 10)), Some(lid(1, 10)))
    );
    assert!(all_entries(&mut log).await?.is_empty());
    assert!(
        segment_files(dir.path()).is_empty(),
        "whole segments are deleted"
    );
    append_durably(&mut log, vec![blank(2, 11)])?;
    drop(log);
    let mut log = LogStore::open(dir.path())?;
    assert_eq!(all_entries(&mut log).await?, vec![blank(2, 11)]);
    Ok(())
}

#[tokio::test]
async fn segments_rotate_and_purge_and_truncate_work_on_whole_files() -> TestResult {
    let dir = TempDir::new()?;
    // Small enough that every segment takes about two entries.
    let options = StoreOptions {
        segment_bytes: 150,
        ..StoreOptions::default()
    };
    let entries = settings(1..=30);
    {
        let mut log = LogStore::open_with(dir.path(), &options)?;
        // One batch spanning many segments, then single appends.
        append_durably(&mut log, entries[..20].to_vec())?;
        for e in &entries[20..] {
            append_durably(&mut log, vec![e.clone()])?;
        }
        let before = segment_files(dir.path()).len();
        assert!(before >= 10, "rotated into {before} segments");

        log.purge(lid(1, 12)).await?;
        let after_purge = segment_files(dir.path()).len();
        assert!(after_purge < before, "purge deleted whole segments");

        log.truncate(lid(1, 25)).await?;
        assert!(
            segment_files(dir.path()).len() < after_purge,
            "truncate deleted newer segments"
        );
        assert_eq!(all_entries(&mut log).await?, entries[12..24].to_vec());
    }
    let mut log = LogStore::open_with(dir.path(), &options)?;
    assert_eq!(all_entries(&mut log).await?, entries[12..24].to_vec());
    append_durably(&mut log, settings(25..=26))?;
    drop(log);
    let mut log = LogStore::open_with(dir.path(), &options)?;
    let got = all_entries(&mut log).await?;
    assert_eq!(got.first().map(|e| e.log_id), Some(lid(1, 13)));
    assert_eq!(got.last().map(|e| e.log_id), Some(lid(1, 26)));
    assert_eq!(got.len(), 14);
    Ok(())
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_appends_continue() -> TestResult {
    let dir = TempDir::new()?;
    let entries = settings(1..=5);
    {
        let mut log = LogStore::open(dir.path())?;
        for e in &entries {
            append_durably(&mut log, vec![e.clone()])?;
        }
    }
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let len = fs::metadata(&files[0])?.len();
    // A crash in the middle of writing the last record.
    OpenOptions::new()
        .write(true)
        .open(&files[0])?
        .set_len(len - 3)?;

    let mut log = LogStore::open(dir.path())?;
    assert_eq!(all_entries(&mut log).await?, entries[..4].to_vec());
    assert_eq!(log.get_log_state().await?.last_log_id, Some(lid(1, 4)));
    let replacement = normal(2, 5, setting("again", "yes"));
    append_durably(&mut log, vec![replacement.clone(), blank(2, 6)])?;
    drop(log);

    // A zero-filled tail (what some filesystems leave after a crash) is cut off too.
    OpenOptions::new()
        .append(true)
        .open(&files[0])?
        .write_all(&[0; 100])?;
    let mut log = LogStore::open(dir.path())?;
    let mut want = entries[..4].to_vec();
    want.extend([replacement, blank(2, 6)]);
    assert_eq!(all_entries(&mut log).await?, want);
    Ok(())
}

#[test]
fn corruption_followed_by_more_log_refuses_to_open() -> TestResult {
    let dir = TempDir::new()?;
    let options = StoreOptions {
        segment_bytes: 150,
        ..StoreOptions::default()
    };
    {
        let mut log = LogStore::open_with(dir.path(), &options)?;
        append_durably(&mut log, settings(1..=10))?;
    }
    let files = segment_files(dir.path());
    assert!(files.len() > 2);
    let mut bytes = fs::read(&files[0])?;
    let last = bytes.len() - 2;
    bytes[last] ^= 0xff;
    fs::write(&files[0], bytes)?;
    match LogStore::open_with(dir.path(), &options) {
        Err(StoreError::Corrupt { .. }) => Ok(()),
        other => Err(format!("expected Corrupt, got {other:?}").into()),
    }
}

#[tokio::test]
// The read under the held gate never waits: the lock only stalls the flusher thread.
#[allow(clippy::await_holding_lock)]
async fn appends_during_an_fsync_share_the_next_one() -> TestResult {
    const APPENDS: u64 = 64;
    let dir = TempDir::new()?;
    let mut log = LogStore::open(dir.path())?;
    let (tx, rx) = std_mpsc::channel();

    // Stand in for a slow disk: the flusher takes the first append, writes it and blocks on its fsync while the
    // others arrive.
    let gate = log.fsync_gate();
    let held = gate.lock();
    for i in 1..=APPENDS {
        let tx = tx.clone();
        log.append_with(vec![blank(1, i)], move |result| {
            let _ = tx.send((i, result.is_ok()));
        })?;
    }
    // Readable at once, durable or not.
    assert_eq!(
        log.try_get_log_entries(1..=APPENDS).await?.len(),
        APPENDS as usize
    );
    drop(held);

    let mut order = Vec::new();
    for _ in 0..APPENDS {
        let (i, ok) = rx.recv_timeout(Duration::from_secs(10))?;
        assert!(ok, "append {i} failed");
        order.push(i);
    }
    assert_eq!(
        order,
        (1..=APPENDS).collect::<Vec<_>>(),
        "callbacks fire in order"
    );
    let fsyncs = log.fsync_count();
    // One fsync for what the flusher took before the gate opened, one for everything queued meanwhile.
    assert!(fsyncs <= 2, "{APPENDS} appends took {fsyncs} fsyncs");
    Ok(())
}

#[tokio::test]
async fn group_commit_without_a_slow_disk() -> TestResult {
    // Without the gate the batching depends on timing, so this only checks that a burst of appends is durable
    // and never takes more fsyncs than appends.
    const APPENDS: u64 = 500;
    let dir = TempDir::new()?;
    let mut log = LogStore::open(dir.path())?;
    let (tx, rx) = std_mpsc::channel();
    for i in 1..=APPENDS {
        let tx = tx.clone();
        log.append_with(vec![blank(1, i)], move |result| {
            let _ = tx.send(result.is_ok());
        })?;
    }
    for _ in 0..APPENDS {
        assert!(rx.recv_timeout(Duration::from_secs(10))?);
    }
    assert!(log.fsync_count() <= APPENDS);
    drop(log);
    let mut log = LogStore::open(dir.path())?;
    assert_eq!(all_entries(&mut log).await?.len(), APPENDS as usize);
    Ok(())
}

#[tokio::test]
async fn state_machine_applies_publishes_snapshots_and_reopens() -> TestResult {
    let dir = TempDir::new()?;
    let options = StoreOptions {
        event_ring: 3,
        ..StoreOptions::default()
    };
    let mut sm = StateMachineStore::open_with(dir.path(), &options)?;
    let mut rx = sm.subscribe();
    let responses = sm
        .apply(vec![
            membership(1, 1, &[1, 2, 3]),
            normal(1, 2, register("a")),
            normal(1, 3, register("b")),
            normal(1, 4, interest("a", &["r1"], &[])),
            blank(2, 5),
            normal(2, 6, setting("k", "v")),
            normal(2, 7, interest("ghost", &["r1"], &[])),
        ])
        .await?;
    let revisions: Vec<u64> = responses.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(responses[6].unknown_edges, vec!["ghost".to_string()]);

    let mut published = Vec::new();
    while let Ok(event) = rx.try_recv() {
        published.push(event.revision);
    }
    assert_eq!(
        published,
        vec![2, 3, 4, 6],
        "only entries that changed something"
    );

    // The ring keeps the last 3 events: 3, 4 and 6.
    let revs = |events: Option<Vec<WatchEvent>>| {
        events.map(|e| e.iter().map(|e| e.revision).collect::<Vec<_>>())
    };
    assert_eq!(revs(sm.events_since(3)), Some(vec![4, 6]));
    assert_eq!(revs(sm.events_since(2)), Some(vec![3, 4, 6]));
    assert_eq!(revs(sm.events_since(1)), None, "event 2 is gone");
    assert_eq!(revs(sm.events_since(6)), Some(vec![]));
    assert_eq!(revs(sm.events_since(100)), Some(vec![]));
    match sm.watch(Some(1)).0 {
        WatchStart::Snapshot(state) => assert_eq!(state.revision, 6),
        other => return Err(format!("expected a snapshot start, got {other:?}").into()),
    }
    assert_eq!(
        sm.watch(Some(4)).0,
        WatchStart::Events(sm.events_since(4).unwrap_or_default())
    );

    let (applied, stored_membership) = sm.applied_state().await?;
    assert_eq!(applied, Some(lid(2, 7)));
    assert_eq!(stored_membership.log_id(), &Some(lid(1, 1)));

    let built = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(built.meta.last_log_id, Some(lid(2, 7)));
    let current = sm
        .get_current_snapshot()
        .await?
        .ok_or("no current snapshot")?;
    assert_eq!(current.meta, built.meta);
    assert_eq!(current.snapshot.get_ref(), built.snapshot.get_ref());

    let state = sm.state();
    drop(sm);
    let mut sm = StateMachineStore::open_with(dir.path(), &options)?;
    assert_eq!(sm.state(), state);
    assert_eq!(sm.applied_state().await?, (applied, stored_membership));
    assert_eq!(
        sm.get_current_snapshot().await?.map(|s| s.meta),
        Some(built.meta)
    );
    // Nothing before the snapshot is known; everything after it will be.
    assert_eq!(revs(sm.events_since(6)), Some(vec![]));
    assert_eq!(revs(sm.events_since(5)), None);
    sm.apply(vec![normal(3, 8, setting("k", "w"))]).await?;
    assert_eq!(revs(sm.events_since(6)), Some(vec![8]));
    Ok(())
}

/// What a watcher knows, built only from changes.
#[derive(Debug, Default, PartialEq)]
struct Model {
    edges: BTreeMap<String, String>,
    interest: BTreeSet<(String, String)>,
    routes: BTreeMap<String, String>,
    endpoints: BTreeMap<String, String>,
    sources: BTreeMap<String, String>,
    settings: BTreeMap<String, String>,
}

impl Model {
    fn of(state: &RegistryState) -> Self {
        let mut model = Self::default();
        model.apply(&state.as_changes());
        model
    }

    fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            match change.clone() {
                Change::EdgeUp { edge, peer_addr } => {
                    self.edges.insert(edge, peer_addr);
                }
                Change::EdgeDown { edge } => {
                    self.edges.remove(&edge);
                    self.interest.retain(|(_, e)| *e != edge);
                }
                Change::InterestAdded { room, edge } => {
                    self.interest.insert((room, edge));
                }
                Change::InterestRemoved { room, edge } => {
                    self.interest.remove(&(room, edge));
                }
                Change::RoutePut { name, route } => {
                    self.routes.insert(name, route);
                }
                Change::RouteDeleted { name } => {
                    self.routes.remove(&name);
                }
                Change::EndpointPut { name, endpoint } => {
                    self.endpoints.insert(name, endpoint);
                }
                Change::EndpointDeleted { name } => {
                    self.endpoints.remove(&name);
                }
                Change::SourceOwned { route, edge } => {
                    self.sources.insert(route, edge);
                }
                Change::SourceReleased { route } => {
                    self.sources.remove(&route);
                }
                Change::SettingPut { key, value } => {
                    self.settings.insert(key, value);
                }
            }
        }
    }
}

#[tokio::test]
async fn installing_a_snapshot_replaces_the_state_and_tells_watchers_the_difference() -> TestResult
{
    let leader_dir = TempDir::new()?;
    let follower_dir = TempDir::new()?;
    let mut leader = StateMachineStore::open(leader_dir.path())?;
    let mut follower = StateMachineStore::open(follower_dir.path())?;

    let prefix = vec![
        membership(1, 1, &[1]),
        normal(1, 2, register("a")),
        normal(1, 3, register("b")),
        normal(1, 4, interest("a", &["r1", "r2"], &[])),
        normal(1, 5, interest("b", &["r1"], &[])),
        normal(
            1,
            6,
            endpoint(
                "in",
                json!({"kind": "redis", "url": "redis://h:1/", "channel": "c"}),
            ),
        ),
        normal(
            1,
            7,
            endpoint("out", json!({"kind": "room", "room": {"c": "1"}})),
        ),
        normal(
            1,
            8,
            Request::PutRoute {
                name: "x".into(),
                route: json!({"from": "in", "to": ["out"]}),
            },
        ),
        normal(
            1,
            9,
            Request::ClaimSource {
                route: "x".into(),
                edge: "a".into(),
            },
        ),
    ];
    let rest = vec![
        normal(1, 10, interest("a", &["r3"], &["r1"])),
        normal(1, 11, register("b")),
        normal(1, 12, interest("b", &["r9"], &[])),
        normal(
            1,
            13,
            Request::RemoveEdges {
                edges: vec!["a".into()],
            },
        ),
        normal(1, 14, register("c")),
        normal(
            1,
            15,
            Request::ClaimSource {
                route: "x".into(),
                edge: "c".into(),
            },
        ),
        normal(1, 16, setting("s", "1")),
    ];
    leader.apply(prefix.clone()).await?;
    leader.apply(rest).await?;
    follower.apply(prefix).await?;

    let old = follower.state();
    let (start, mut rx) = follower.watch(Some(old.revision));
    assert_eq!(start, WatchStart::Events(vec![]));

    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await?;
    let mut received = follower.begin_receiving_snapshot().await?;
    *received = *snapshot.snapshot;
    follower.install_snapshot(&snapshot.meta, received).await?;

    assert_eq!(follower.state(), leader.state());
    assert_eq!(
        follower.applied_state().await?,
        leader.applied_state().await?
    );
    assert_eq!(
        follower.get_current_snapshot().await?.map(|s| s.meta),
        Some(snapshot.meta)
    );
    let event = rx.try_recv()?;
    assert_eq!(event.revision, leader.state().revision);
    let mut model = Model::of(&old);
    model.apply(&event.changes);
    assert_eq!(model, Model::of(&leader.state()));
    // The ring stays a consistent history for watchers that were behind the old state too.
    assert_eq!(follower.events_since(old.revision), Some(vec![event]));

    // A mismatched snapshot is refused.
    let mut bad = follower.begin_receiving_snapshot().await?;
    bad.get_mut().extend_from_slice(b"{\"last_applied\":null,\"last_membership\":{\"log_id\":null,\"membership\":{\"configs\":[],\"nodes\":{}}},\"state\":{\"revision\":0,\"edges\":{},\"interest\":{},\"routes\":{},\"settings\":{}}}");
    let meta = leader
        .get_current_snapshot()
        .await?
        .ok_or("no snapshot")?
        .meta;
    assert!(follower.install_snapshot(&meta, bad).await.is_err());
    Ok(())
}

#[test]
fn diff_of_equal_states_is_empty() {
    let mut state = RegistryState::default();
    state.apply(1, &register("a"));
    state.apply(2, &interest("a", &["r"], &[]));
    assert!(diff(&state, &state.clone()).is_empty());
    let changes = diff(&RegistryState::default(), &state);
    let mut model = Model::default();
    model.apply(&changes);
    assert_eq!(model, Model::of(&state));
}

/// A network for a cluster of one: there is never anyone to send to.
struct NoNetwork;

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, RegistryNode, E> {
    RPCError::Unreachable(Unreachable::new(&io::Error::other("a cluster of one")))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: NodeId, _node: &RegistryNode) -> NoNetwork {
        NoNetwork
    }
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RegistryNode, RaftError<NodeId>>>
    {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RegistryNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RegistryNode, RaftError<NodeId>>> {
        Err(unreachable())
    }
}

fn raft_config() -> Result<Arc<Config>, Box<dyn std::error::Error>> {
    let config = Config {
        cluster_name: "test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Config::default()
    };
    Ok(Arc::new(config.validate()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_single_node_registry_keeps_every_committed_change() -> TestResult {
    let dir = TempDir::new()?;
    let wait = Some(Duration::from_secs(10));
    let (before, last_index) = {
        let (log, sm) = open(dir.path())?;
        let raft = Raft::new(1, raft_config()?, NoNetwork, log, sm.clone()).await?;
        let mut members = BTreeMap::new();
        members.insert(
            1,
            RegistryNode {
                addr: "127.0.0.1:1".into(),
            },
        );
        raft.initialize(members).await?;
        raft.wait(wait).state(ServerState::Leader, "leader").await?;
        let mut last = 0;
        for i in 0..10 {
            last = raft
                .client_write(setting(&format!("k{i}"), &format!("v{i}")))
                .await?
                .log_id
                .index;
            if i == 4 {
                // A snapshot in the middle: the restart must combine it with the log after it.
                raft.trigger().snapshot().await?;
                raft.wait(wait)
                    .metrics(|m| m.snapshot.is_some(), "snapshot built")
                    .await?;
            }
        }
        raft.client_write(register("edge-1")).await?;
        last += 1;
        raft.shutdown().await?;
        (sm.state(), last)
    };
    assert_eq!(before.settings.len(), 10);
    assert_eq!(before.revision, last_index);

    let (log, sm) = open(dir.path())?;
    assert!(
        sm.get_current_snapshot_meta_for_test().await.is_some(),
        "the snapshot was persisted"
    );
    let raft = Raft::new(1, raft_config()?, NoNetwork, log, sm.clone()).await?;
    // Re-applied from the persisted committed id while starting, before any election.
    assert_eq!(sm.state(), before);
    assert_eq!(sm.last_applied().map(|id| id.index), Some(last_index));
    raft.wait(wait)
        .state(ServerState::Leader, "leader again")
        .await?;
    raft.client_write(setting("after", "restart")).await?;
    assert_eq!(
        sm.state().settings.get("after").map(String::as_str),
        Some("restart")
    );
    raft.shutdown().await?;
    Ok(())
}

impl StateMachineStore {
    async fn get_current_snapshot_meta_for_test(
        &self,
    ) -> Option<openraft::SnapshotMeta<NodeId, RegistryNode>> {
        let mut sm = self.clone();
        sm.get_current_snapshot()
            .await
            .ok()
            .flatten()
            .map(|s| s.meta)
    }
}

#[test]
fn open_with_creates_both_stores_in_one_directory() -> TestResult {
    let dir = TempDir::new()?;
    let nested = dir.path().join("a/b");
    let (log, sm) = open_with(&nested, &StoreOptions::default())?;
    assert_eq!(log.dir(), nested.as_path());
    assert_eq!(sm.state(), RegistryState::default());
    Ok(())
}
