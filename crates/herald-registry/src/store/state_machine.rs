//! The state machine: the [`RegistryState`] in memory, every change published to watchers, and snapshots on disk.
//!
//! `apply` does not write to disk: the state is persisted only as snapshots, and on restart openraft re-applies
//! the committed log after the snapshot (the log store persists the committed id for that).

use std::collections::{BTreeSet, VecDeque};
use std::fmt::{self, Debug};
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageError, StoredMembership,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use super::{
    create_dir, io_err, read_json, remove_stale_tmp, storage_error, to_json, write_atomic,
    StoreError, StoreOptions,
};
use crate::state::{Change, RegistryState};
use crate::types::{NodeId, RegistryNode, Response, TypeConfig};

const SNAPSHOT: &str = "snapshot.json";

type Membership = StoredMembership<NodeId, RegistryNode>;
type Meta = SnapshotMeta<NodeId, RegistryNode>;

/// The changes one applied log entry made, as watchers receive them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// The revision (raft log index) the changes were made at; strictly increasing from event to event.
    pub revision: u64,
    /// What changed, in order. Never empty. Shared: the event sits in the resume ring and goes to every watcher.
    pub changes: Arc<[Change]>,
}

/// Where a watcher starts, from [`StateMachineStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStart {
    /// Every event after the watcher's revision, in order.
    Events(Vec<WatchEvent>),
    /// The watcher had no revision, or one older than the kept events: it starts over from this whole state
    /// (see [`RegistryState::as_changes`]), which is at `state.revision`.
    Snapshot(RegistryState),
}

/// The registry's raft state machine. A cheap-clone handle: openraft owns one clone, and the registry's services
/// keep others to read the state and follow its changes.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    inner: RwLock<Inner>,
    /// Live events. Sent while `inner` is write-locked, so a receiver taken under the lock misses nothing.
    events: broadcast::Sender<WatchEvent>,
    ring_capacity: usize,
    /// The persisted snapshot's metadata. Held while a snapshot file is written, so that a slow build cannot
    /// overwrite a newer snapshot installed meanwhile (openraft builds in a task of its own).
    snapshot: tokio::sync::Mutex<Option<Meta>>,
}

struct Inner {
    state: RegistryState,
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    /// The most recent events, oldest first.
    ring: VecDeque<WatchEvent>,
    /// Every event with a revision above this is in `ring`.
    ring_floor: u64,
}

/// A snapshot's data: what a leader sends a follower, and the `data` of the snapshot file.
#[derive(Serialize, Deserialize)]
struct Payload {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    state: RegistryState,
}

/// The snapshot file. `data` is kept as the exact bytes that were built or received.
#[derive(Deserialize)]
struct SnapshotFile {
    meta: Meta,
    data: Box<RawValue>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir, &StoreOptions::default())
    }

    /// Opens the state machine in `dir`, starting from the snapshot there if there is one.
    pub fn open_with(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        create_dir(&dir)?;
        remove_stale_tmp(&dir, &[SNAPSHOT])?;
        let path = dir.join(SNAPSHOT);
        let (inner, meta) = match read_json::<SnapshotFile>(&path)? {
            Some(file) => {
                let payload: Payload =
                    serde_json::from_str(file.data.get()).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: format!("snapshot data: {e}"),
                    })?;
                tracing::info!(snapshot = %file.meta, "state machine starts from its snapshot");
                let inner = Inner {
                    // Nothing is known of the events before the snapshot; every later one will be applied here.
                    ring_floor: payload.state.revision,
                    state: payload.state,
                    last_applied: payload.last_applied,
                    last_membership: payload.last_membership,
                    ring: VecDeque::new(),
                };
                (inner, Some(file.meta))
            }
            None => (
                Inner {
                    state: RegistryState::default(),
                    last_applied: None,
                    last_membership: Membership::default(),
                    ring: VecDeque::new(),
                    ring_floor: 0,
                },
                None,
            ),
        };
        let (events, _) = broadcast::channel(options.event_channel.max(1));
        Ok(Self {
            shared: Arc::new(Shared {
                dir,
                inner: RwLock::new(inner),
                events,
                ring_capacity: options.event_ring,
                snapshot: tokio::sync::Mutex::new(meta),
            }),
        })
    }

    /// Live events from now on. A receiver that falls more than `event_channel` events behind gets
    /// `RecvError::Lagged`, and can catch up with [`Self::events_since`] (or start over from [`Self::state`]).
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.shared.events.subscribe()
    }

    /// The events after `revision`, in order; None if some of them are no longer kept (the caller then sends
    /// the whole state instead). A revision ahead of this member's gives an empty list.
    pub fn events_since(&self, revision: u64) -> Option<Vec<WatchEvent>> {
        events_since(&self.shared.inner.read(), revision)
    }

    /// A copy of the current state.
    pub fn state(&self) -> RegistryState {
        self.shared.inner.read().state.clone()
    }

    /// Runs `f` on the current state under a read lock (which holds up `apply`, so keep `f` short).
    pub fn read_state<R>(&self, f: impl FnOnce(&RegistryState) -> R) -> R {
        f(&self.shared.inner.read().state)
    }

    /// The id of the last applied log entry.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.shared.inner.read().last_applied
    }

    /// Starts a watcher atomically: what it must catch up on (the events after `since`, or the whole state if
    /// `since` is None or too old) and a receiver of every later event, with nothing missed in between.
    ///
    /// Events can repeat revisions the watcher already has (for example one that saw revision R from another
    /// member asking a member still behind R), so a watcher ignores events at or below its revision.
    pub fn watch(&self, since: Option<u64>) -> (WatchStart, broadcast::Receiver<WatchEvent>) {
        let inner = self.shared.inner.read();
        // Under the read lock, so no event can be published between the catch-up and the subscription.
        let rx = self.shared.events.subscribe();
        let start = match since.and_then(|rev| events_since(&inner, rev)) {
            Some(events) => WatchStart::Events(events),
            None => WatchStart::Snapshot(inner.state.clone()),
        };
        (start, rx)
    }

    /// Records an event in the ring and sends it to live receivers; `inner` is write-locked by the caller.
    fn publish(&self, inner: &mut Inner, event: WatchEvent) {
        if self.shared.ring_capacity == 0 {
            inner.ring_floor = event.revision;
        } else {
            if inner.ring.len() >= self.shared.ring_capacity {
                if let Some(old) = inner.ring.pop_front() {
                    inner.ring_floor = old.revision;
                }
            }
            inner.ring.push_back(event.clone());
        }
        // An error only means nobody is subscribed right now.
        let _ = self.shared.events.send(event);
    }

    /// Writes a snapshot file, unless a newer snapshot is already persisted (and `replace` is false).
    async fn persist_snapshot(
        &self,
        meta: &Meta,
        data: &[u8],
        replace: bool,
    ) -> Result<(), StoreError> {
        let mut current = self.shared.snapshot.lock().await;
        if !replace
            && current
                .as_ref()
                .is_some_and(|c| c.last_log_id > meta.last_log_id)
        {
            return Ok(());
        }
        // {"meta": ..., "data": ...} assembled by hand so `data` is stored byte for byte (it is valid JSON: it was
        // serialized here or parsed before this is called).
        let meta_json = to_json("snapshot meta", meta)?;
        let mut file = Vec::with_capacity(meta_json.len() + data.len() + 20);
        file.extend_from_slice(b"{\"meta\":");
        file.extend_from_slice(&meta_json);
        file.extend_from_slice(b",\"data\":");
        file.extend_from_slice(data);
        file.push(b'}');
        let dir = self.shared.dir.clone();
        let path = dir.join(SNAPSHOT);
        tokio::task::spawn_blocking(move || write_atomic(&dir, SNAPSHOT, &file))
            .await
            .map_err(|e| io_err("write", &path)(io::Error::other(e.to_string())))??;
        *current = Some(meta.clone());
        Ok(())
    }
}

fn events_since(inner: &Inner, revision: u64) -> Option<Vec<WatchEvent>> {
    if revision < inner.ring_floor {
        return None;
    }
    let start = inner.ring.partition_point(|e| e.revision <= revision);
    Some(inner.ring.range(start..).cloned().collect())
}

impl Debug for StateMachineStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("dir", &self.shared.dir)
            .field("last_applied", &self.last_applied())
            .finish_non_exhaustive()
    }
}

fn blank_response(index: u64) -> Response {
    Response {
        revision: index,
        ..Default::default()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let inner = self.shared.inner.read();
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.shared.inner.write();
        let mut responses = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            inner.last_applied = Some(log_id);
            let response = match entry.payload {
                EntryPayload::Normal(request) => {
                    let (response, changes) = inner.state.apply(log_id.index, &request);
                    if !changes.is_empty() {
                        let event = WatchEvent {
                            revision: log_id.index,
                            changes: changes.into(),
                        };
                        self.publish(&mut inner, event);
                    }
                    response
                }
                EntryPayload::Membership(membership) => {
                    inner.last_membership = StoredMembership::new(Some(log_id), membership);
                    blank_response(log_id.index)
                }
                EntryPayload::Blank => blank_response(log_id.index),
            };
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let to_err = |e: StoreError| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                &e,
            )
        };
        let data = snapshot.into_inner();
        let payload: Payload = serde_json::from_slice(&data).map_err(|e| {
            to_err(StoreError::SnapshotMismatch(format!(
                "unreadable data: {e}"
            )))
        })?;
        if payload.last_applied != meta.last_log_id
            || payload.last_membership != meta.last_membership
        {
            return Err(to_err(StoreError::SnapshotMismatch(format!(
                "data is at {:?}, meta says {:?}",
                payload.last_applied, meta.last_log_id
            ))));
        }
        // Persisted before the state is replaced: openraft purges the log the snapshot covers right after, and
        // from then on this file is the only way back to the state.
        self.persist_snapshot(meta, &data, true)
            .await
            .map_err(to_err)?;

        let mut inner = self.shared.inner.write();
        // Watchers see the jump as the changes between the two states, so they stay in step without starting
        // over; the events before it stay valid, since the old state was on the way to the new one.
        let changes = diff(&inner.state, &payload.state);
        inner.state = payload.state;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        if !changes.is_empty() {
            let revision = inner.state.revision;
            if inner.ring.back().is_some_and(|e| e.revision >= revision) {
                // Cannot happen with a snapshot from the same history (it is ahead of everything applied here).
                // Were it to, watchers must start over rather than receive revisions out of order.
                tracing::warn!(
                    revision,
                    "installed snapshot is not ahead of the published events"
                );
                inner.ring.clear();
                inner.ring_floor = revision;
            }
            self.publish(
                &mut inner,
                WatchEvent {
                    revision,
                    changes: changes.into(),
                },
            );
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let to_err =
            |e: StoreError| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, &e);
        let path = self.shared.dir.join(SNAPSHOT);
        let read_path = path.clone();
        let file = tokio::task::spawn_blocking(move || read_json::<SnapshotFile>(&read_path))
            .await
            .map_err(|e| to_err(io_err("read", &path)(io::Error::other(e.to_string()))))?
            .map_err(to_err)?;
        Ok(file.map(|file| Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data.get().as_bytes().to_vec())),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let to_err =
            |e: StoreError| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, &e);
        // Copied under the lock and serialized outside it, so `apply` waits only for the copy.
        let payload = {
            let inner = self.shared.inner.read();
            Payload {
                last_applied: inner.last_applied,
                last_membership: inner.last_membership.clone(),
                state: inner.state.clone(),
            }
        };
        let data = to_json("snapshot", &payload).map_err(to_err)?;
        // Two builds at the same log id may differ in bytes, so the id also carries the build time.
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let snapshot_id = match &payload.last_applied {
            Some(id) => format!("{id}-{millis}"),
            None => format!("empty-{millis}"),
        };
        let meta = Meta {
            last_log_id: payload.last_applied,
            last_membership: payload.last_membership,
            snapshot_id,
        };
        self.persist_snapshot(&meta, &data, false)
            .await
            .map_err(to_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// The changes that turn `old` into `new`, in the vocabulary `apply` uses: an edge whose record changed was
/// re-registered (down, then up, with its interest cleared), and `EdgeDown` implies its interest is gone.
///
/// Settings have no removal change, and none is needed: `apply` never removes one, so a later state has every
/// setting an earlier one had.
pub(crate) fn diff(old: &RegistryState, new: &RegistryState) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut reset = BTreeSet::new();
    for (edge, record) in &old.edges {
        if new.edges.get(edge) != Some(record) {
            changes.push(Change::EdgeDown { edge: edge.clone() });
            reset.insert(edge);
        }
    }
    for (edge, record) in &new.edges {
        if old.edges.get(edge) != Some(record) {
            changes.push(Change::EdgeUp {
                edge: edge.clone(),
                peer_addr: record.peer_addr.clone(),
            });
        }
    }
    let has = |state: &RegistryState, room: &String, edge: &String| {
        state
            .interest
            .get(room)
            .is_some_and(|edges| edges.contains(edge))
    };
    for (room, edges) in &old.interest {
        for edge in edges {
            if !reset.contains(edge) && !has(new, room, edge) {
                changes.push(Change::InterestRemoved {
                    room: room.clone(),
                    edge: edge.clone(),
                });
            }
        }
    }
    for (room, edges) in &new.interest {
        for edge in edges {
            if reset.contains(edge) || !has(old, room, edge) {
                changes.push(Change::InterestAdded {
                    room: room.clone(),
                    edge: edge.clone(),
                });
            }
        }
    }
    for name in old.routes.keys() {
        if !new.routes.contains_key(name) {
            changes.push(Change::RouteDeleted { name: name.clone() });
        }
    }
    for (name, route) in &new.routes {
        if old.routes.get(name) != Some(route) {
            changes.push(Change::RoutePut {
                name: name.clone(),
                route: route.clone(),
            });
        }
    }
    for name in old.endpoints.keys() {
        if !new.endpoints.contains_key(name) {
            changes.push(Change::EndpointDeleted { name: name.clone() });
        }
    }
    for (name, endpoint) in &new.endpoints {
        if old.endpoints.get(name) != Some(endpoint) {
            changes.push(Change::EndpointPut {
                name: name.clone(),
                endpoint: endpoint.clone(),
            });
        }
    }
    for (route, owner) in &old.sources {
        if new.sources.get(route) != Some(owner) {
            changes.push(Change::SourceReleased {
                route: route.clone(),
            });
        }
    }
    for (route, owner) in &new.sources {
        if old.sources.get(route) != Some(owner) {
            changes.push(Change::SourceOwned {
                route: route.clone(),
                edge: owner.clone(),
            });
        }
    }
    for (key, value) in &new.settings {
        if old.settings.get(key) != Some(value) {
            changes.push(Change::SettingPut {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    changes
}
