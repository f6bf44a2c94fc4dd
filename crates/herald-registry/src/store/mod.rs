//! Durable raft storage: the log and vote in segment files, the state machine with snapshots.
//!
//! [`open`] opens both halves from one data directory:
//! - [`LogStore`] (`log.rs`): openraft's `RaftLogStorage`. The log lives in append-only segment files written by
//!   one flusher thread that group-commits (appends arriving while an fsync runs share the next one); the vote,
//!   the committed log id and the last purged log id are small JSON files replaced atomically. `segment.rs`
//!   holds the record format and the replay scan.
//! - [`StateMachineStore`] (`state_machine.rs`): openraft's `RaftStateMachine`, holding the
//!   [`RegistryState`](crate::RegistryState) in memory, publishing every change as a [`WatchEvent`], and persisting
//!   the state only as snapshots. On restart openraft re-applies the committed log after the snapshot, which is
//!   why the log store persists `committed`.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/log-00000000000000000001.seg   log segments, numbered in write order (20 digits, so names sort)
//! <dir>/log-00000000000000000002.seg   a new one is started once the current one passes `segment_bytes`
//! <dir>/vote.json                      the last saved vote (openraft `Vote`, JSON)
//! <dir>/committed.json                 the last saved committed log id (`Option<LogId>`, JSON)
//! <dir>/purged.json                    the last purged log id (`Option<LogId>`, JSON)
//! <dir>/snapshot.json                  the current snapshot: {"meta": SnapshotMeta, "data": payload}
//! <dir>/*.tmp                          a replacement being written; removed on open
//! ```
//!
//! A segment is a sequence of records, nothing else: `len: u32 LE | crc32(payload): u32 LE | payload`, where the
//! payload is one `openraft::Entry<TypeConfig>` as JSON. Entries are contiguous across segments. Segment files
//! may still hold entries at or below the purged id (purge deletes whole files only); replay skips them.
//!
//! The small JSON files are replaced by writing `<name>.tmp`, fsyncing it, renaming it over `<name>` and fsyncing
//! the directory, so each is always either the old or the new value. The snapshot payload (what a leader streams
//! to a follower) is `{"last_applied", "last_membership", "state"}` as JSON.
//!
//! # Crash safety
//!
//! - An append is acknowledged (its callback called) only after the segment holding it was fsynced.
//! - A segment is fsynced before the next one is created, so only the newest segment can have a torn tail. On
//!   open, a torn or corrupt record at the tail is cut off with a warning; one followed by more data is an error.
//! - Truncation deletes newer segments before cutting the one that keeps a prefix, and purge records the purged
//!   id before deleting old segments, so a crash part-way through either leaves a log without holes.
//! - `save_vote`, `truncate` and `purge` return once on disk; earlier appends are made durable before them.
//! - `committed.json` is written only after every entry appended before it was fsynced, so it never points past
//!   the durable log. `save_committed` does not wait for it: it is written at most every 100 ms (each write costs two
//!   fsyncs, which per entry would dominate a lightly loaded log). A stale committed id is safe (openraft re-applies less on restart and
//!   learns the rest from the leader); dropping the store writes the latest one.

mod log;
mod segment;
mod state_machine;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use serde::de::DeserializeOwned;

pub use self::log::{LogReader, LogStore};
pub use self::state_machine::{StateMachineStore, WatchEvent, WatchStart};
use crate::types::NodeId;

/// Tunables for [`open_with`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A segment file is closed and a new one started once it holds at least this many bytes. Purge deletes whole
    /// segments, so this is also the granularity at which disk space is given back.
    pub segment_bytes: u64,
    /// How many recent [`WatchEvent`]s the state machine keeps for [`StateMachineStore::events_since`].
    pub event_ring: usize,
    /// The capacity of the live [`StateMachineStore::subscribe`] channel; a receiver further behind than this
    /// gets `RecvError::Lagged` and should resume with `events_since`.
    pub event_channel: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            event_ring: 10_000,
            event_channel: 4096,
        }
    }
}

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}", path = .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file holds something this store did not write, or not in this order.
    #[error("{path}: {reason}", path = .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A value could not be serialized.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why not.
        reason: String,
    },
    /// An append would leave a hole in (or rewrite) the log.
    #[error("log entries must be contiguous: expected index {expected}, got {got}")]
    Gap {
        /// The index the next entry must have.
        expected: u64,
        /// The index it had.
        got: u64,
    },
    /// A snapshot handed to `install_snapshot` does not match its metadata.
    #[error("snapshot does not match its metadata: {0}")]
    SnapshotMismatch(String),
    /// An earlier write failed; after a failed write or fsync the files cannot be trusted, so the log store
    /// refuses all further writes (openraft then shuts the node down).
    #[error("the log store stopped after an earlier error: {0}")]
    Failed(String),
    /// The flusher thread is gone (it only stops when the store is dropped, or if it panicked).
    #[error("the log flusher thread is gone")]
    FlusherGone,
}

/// Opens (creating if needed) the log store and the state machine in `dir`, with default options.
pub fn open(dir: impl AsRef<Path>) -> Result<(LogStore, StateMachineStore), StoreError> {
    open_with(dir, &StoreOptions::default())
}

/// Opens (creating if needed) the log store and the state machine in `dir`.
pub fn open_with(
    dir: impl AsRef<Path>,
    options: &StoreOptions,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let dir = dir.as_ref();
    let log = LogStore::open_with(dir, options)?;
    let sm = StateMachineStore::open_with(dir, options)?;
    Ok((log, sm))
}

/// Wraps an [`io::Error`] with what was being done to which path.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// Creates `dir` (and parents) if missing.
pub(crate) fn create_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))
}

/// Makes creations, renames and removals of entries in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    // Only POSIX systems can open and fsync a directory; elsewhere renames are made durable by the OS or not
    // at all, and there is nothing more to do here.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new content, never a mix.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    // The data must be on disk before the rename makes it visible, or a crash could expose an empty file.
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)
}

/// Reads and parses a JSON file, or None if it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Serializes `value` as JSON.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(
    what: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// Removes `<name>.tmp` leftovers of replacements a crash interrupted.
pub(crate) fn remove_stale_tmp(dir: &Path, names: &[&str]) -> Result<(), StoreError> {
    for name in names {
        let tmp = dir.join(format!("{name}.tmp"));
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::info!(path = %tmp.display(), "removed an interrupted write"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &tmp)(e)),
        }
    }
    Ok(())
}

/// openraft's error for a failed storage operation.
pub(crate) fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: &StoreError,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(e)).into()
}
