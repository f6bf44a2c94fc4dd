//! The raft log store: entries in append-only segment files, written and fsynced by one flusher thread.
//!
//! Every entry is also kept in memory (the registry purges its log after each snapshot, so the unpurged log is
//! small): reads never touch the disk, and appended entries are readable the moment `append` returns, before the
//! flusher has written them.
//!
//! All writes go through the flusher, in the order they were issued (openraft requires log and vote writes to be
//! serialized). The flusher takes every command already queued, writes the appends among them, and makes them
//! durable with a single fsync before calling their callbacks: appends that arrive while an fsync is running are
//! committed together by the next one.

use std::collections::VecDeque;
use std::fmt::{self, Debug};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader, StorageError,
    Vote,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use super::segment::{self, EncodeError};
use super::{
    create_dir, io_err, read_json, remove_stale_tmp, storage_error, sync_dir, to_json,
    write_atomic, StoreError, StoreOptions,
};
use crate::types::{NodeId, TypeConfig};

const VOTE: &str = "vote.json";
const COMMITTED: &str = "committed.json";
const PURGED: &str = "purged.json";

/// How many queued commands the flusher takes into one group commit at most, so that a steady stream of
/// appends cannot postpone the fsync (and every callback) indefinitely.
const MAX_BATCH: usize = 4096;

/// How often, at most, the committed id is persisted (it costs two fsyncs; a stale one is safe).
const COMMITTED_INTERVAL: Duration = Duration::from_millis(100);

type RegistryEntry = Entry<TypeConfig>;
type RegistryLogId = LogId<NodeId>;

/// Called once an append is durable (or failed).
type Done = Box<dyn FnOnce(io::Result<()>) + Send>;
/// Answers a write the caller waits for.
type Reply = oneshot::Sender<Result<(), StoreError>>;

/// The durable raft log, with the vote and the committed log id. See the [module docs](super) for the layout.
///
/// Dropping it lets the flusher finish what was queued and waits for it, so the directory can be reopened at
/// once.
pub struct LogStore {
    shared: Arc<Shared>,
    dir: PathBuf,
    /// `Some` until dropped: closing the channel is how the flusher is told to stop.
    tx: Option<mpsc::Sender<Command>>,
    flusher: Option<thread::JoinHandle<()>>,
}

/// A cloneable reader of the log, for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogReader {
    /// The index of the last entry known committed (`None` before the first commit).
    pub fn committed_index(&self) -> Option<u64> {
        self.shared.mem.read().committed.map(|id| id.index)
    }
}

/// What the store and its readers share.
struct Shared {
    mem: RwLock<MemLog>,
    /// fsyncs of segment files that made appended entries durable.
    fsyncs: AtomicU64,
    /// The first write error, after which every write is refused: after a failed write or fsync the state of
    /// the file is unknown, so carrying on could acknowledge entries that are not on disk.
    failure: Mutex<Option<String>>,
    /// Held by a test to stall the flusher just before it fsyncs, standing in for a slow disk.
    #[cfg(test)]
    fsync_gate: Arc<Mutex<()>>,
}

impl Shared {
    fn check(&self) -> Result<(), StoreError> {
        match &*self.failure.lock() {
            Some(msg) => Err(StoreError::Failed(msg.clone())),
            None => Ok(()),
        }
    }
}

/// The log as readers see it.
#[derive(Default)]
struct MemLog {
    /// Contiguous entries after `last_purged`.
    entries: VecDeque<RegistryEntry>,
    last_purged: Option<RegistryLogId>,
    vote: Option<Vote<NodeId>>,
    committed: Option<RegistryLogId>,
}

impl MemLog {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    /// The last entry's id or, with no entries, the last purged id (what openraft expects).
    fn last_log_id(&self) -> Option<RegistryLogId> {
        self.entries.back().map(|e| e.log_id).or(self.last_purged)
    }

    /// The index the next appended entry must have, if anything fixes it (an empty, never purged log accepts
    /// any first index).
    fn next_index(&self) -> Option<u64> {
        self.last_log_id().map(|id| id.index + 1)
    }

    fn range(&self, range: impl RangeBounds<u64>) -> Vec<RegistryEntry> {
        let Some(first) = self.first_index() else {
            return Vec::new();
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let lo = start.max(first) - first;
        let hi = end
            .min(first + self.entries.len() as u64)
            .saturating_sub(first);
        if lo >= hi {
            return Vec::new();
        }
        self.entries
            .range(lo as usize..hi as usize)
            .cloned()
            .collect()
    }

    /// Removes entries at and after `index`.
    fn truncate_from(&mut self, index: u64) {
        if let Some(first) = self.first_index() {
            self.entries.truncate(index.saturating_sub(first) as usize);
        }
    }

    /// Removes entries at and before `index`.
    fn purge_upto(&mut self, index: u64) {
        if let Some(first) = self.first_index() {
            let n =
                (index.saturating_add(1).saturating_sub(first) as usize).min(self.entries.len());
            self.entries.drain(..n);
        }
    }
}

/// A write for the flusher.
enum Command {
    /// Encoded records (`(index, record length)` for each, in order) to write and fsync.
    Append {
        buf: Vec<u8>,
        records: Vec<(u64, u64)>,
        done: Done,
    },
    SaveVote {
        vote: Vote<NodeId>,
        reply: Reply,
    },
    /// Not waited for: a stale committed id on disk only means re-applying less on restart.
    SaveCommitted {
        committed: Option<RegistryLogId>,
    },
    Truncate {
        index: u64,
        reply: Reply,
    },
    Purge {
        log_id: RegistryLogId,
        reply: Reply,
    },
}

impl LogStore {
    /// Opens (creating if needed) the log store in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir, &StoreOptions::default())
    }

    /// Opens (creating if needed) the log store in `dir`: reads the vote, committed and purged ids, replays the
    /// segments (cutting off a torn tail) and starts the flusher thread.
    pub fn open_with(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        create_dir(&dir)?;
        remove_stale_tmp(&dir, &[VOTE, COMMITTED, PURGED])?;
        let vote: Option<Vote<NodeId>> = read_json(&dir.join(VOTE))?;
        let committed = read_json::<Option<RegistryLogId>>(&dir.join(COMMITTED))?.flatten();
        let last_purged = read_json::<Option<RegistryLogId>>(&dir.join(PURGED))?.flatten();

        let replayed = replay(&dir, last_purged)?;
        let mut mem = MemLog {
            entries: replayed.entries,
            last_purged,
            vote,
            committed,
        };
        if let Some(c) = committed {
            // Cannot happen (committed is written after the entries it covers are fsynced), but if the log were
            // to end before it, openraft would fail to re-apply it and refuse to start. Forgetting it is safe:
            // the committed index is learned again from the leader.
            let present = mem.range(c.index..=c.index).first().map(|e| e.log_id);
            let consistent = match present {
                Some(id) => id == c,
                None => mem.last_purged.is_some_and(|p| c.index <= p.index),
            };
            if !consistent {
                tracing::warn!(
                    committed = %c,
                    last_log = ?mem.last_log_id(),
                    "committed log id is not in the log; ignoring it"
                );
                mem.committed = None;
            }
        }

        let shared = Arc::new(Shared {
            mem: RwLock::new(mem),
            fsyncs: AtomicU64::new(0),
            failure: Mutex::new(None),
            #[cfg(test)]
            fsync_gate: Arc::default(),
        });
        let mut flusher = Flusher {
            dir: dir.clone(),
            segment_bytes: options.segment_bytes.max(1),
            segments: replayed.segments,
            next_seq: replayed.next_seq,
            active: None,
            unsynced: false,
            waiting: Vec::new(),
            committed: None,
            shared: shared.clone(),
        };
        if let Some(p) = last_purged {
            // Finishes a purge a crash interrupted after purged.json was written.
            flusher.remove_purged_segments(p.index)?;
        }
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher.run(rx))
            .map_err(io_err("spawn the log flusher for", &dir))?;
        Ok(Self {
            shared,
            dir,
            tx: Some(tx),
            flusher: Some(handle),
        })
    }

    /// How many fsyncs of segment files have made appended entries durable since the store was opened. With
    /// group commit this grows slower than the number of appends under concurrent load.
    pub fn fsync_count(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A reader sharing this store's log.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// The lock the flusher takes just before each fsync: holding it simulates a slow disk.
    #[cfg(test)]
    pub(crate) fn fsync_gate(&self) -> Arc<Mutex<()>> {
        self.shared.fsync_gate.clone()
    }

    /// Appends `entries` (which must continue the log) and hands them to the flusher; `done` is called once
    /// they are fsynced. The entries are readable when this returns.
    pub(crate) fn append_with(
        &mut self,
        entries: impl IntoIterator<Item = RegistryEntry>,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> Result<(), StoreError> {
        self.shared.check()?;
        let (mut expected, purged) = {
            let mem = self.shared.mem.read();
            (mem.next_index(), mem.last_purged.map(|p| p.index))
        };
        // Entries at or below the purge point are covered by a snapshot: there is nothing to keep them for. They
        // can arrive: openraft's startup purges the log up to the state machine's last applied entry, even past
        // the log's end (its storage suite then appends below that point).
        let entries: Vec<RegistryEntry> = entries
            .into_iter()
            .filter(|e| purged.is_none_or(|p| e.log_id.index > p))
            .collect();
        let mut buf = Vec::new();
        let mut records = Vec::with_capacity(entries.len());
        for entry in &entries {
            let index = entry.log_id.index;
            if let Some(expected) = expected {
                if index != expected {
                    return Err(StoreError::Gap {
                        expected,
                        got: index,
                    });
                }
            }
            expected = Some(index + 1);
            let len = segment::encode_record(&mut buf, |b| serde_json::to_writer(b, entry))
                .map_err(|e| StoreError::Encode {
                    what: format!("log entry {index}"),
                    reason: match e {
                        EncodeError::Payload(e) => e.to_string(),
                        EncodeError::Size(n) => format!("a payload of {n} bytes is out of range"),
                    },
                })?;
            records.push((index, len as u64));
        }
        // Readers see the entries before they are durable: raft allows replicating what the leader has not
        // flushed yet (the leader's own flush is tracked separately through the callback).
        self.shared.mem.write().entries.extend(entries);
        self.send(Command::Append {
            buf,
            records,
            done: Box::new(done),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return Err(StoreError::FlusherGone);
        };
        tx.send(cmd).map_err(|mpsc::SendError(cmd)| {
            if let Command::Append { done, .. } = cmd {
                done(Err(io::Error::other(StoreError::FlusherGone.to_string())));
            }
            StoreError::FlusherGone
        })
    }

    /// Sends a write and waits until the flusher has done it.
    async fn request(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), StoreError> {
        self.shared.check()?;
        let (reply, done) = oneshot::channel();
        self.send(make(reply))?;
        done.await.map_err(|_| StoreError::FlusherGone)?
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.dir)
            .field("fsyncs", &self.fsync_count())
            .finish_non_exhaustive()
    }
}

impl Debug for LogReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogReader").finish_non_exhaustive()
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Closing the channel lets the flusher write and fsync everything already queued, then exit; waiting for
        // it means a store reopened from the same directory never races the previous flusher.
        drop(self.tx.take());
        if let Some(handle) = self.flusher.take() {
            if handle.join().is_err() {
                tracing::error!(dir = %self.dir.display(), "the raft log flusher panicked");
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RegistryEntry>, StorageError<NodeId>> {
        Ok(self.shared.mem.read().range(range))
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RegistryEntry>, StorageError<NodeId>> {
        Ok(self.shared.mem.read().range(range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let mem = self.shared.mem.read();
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.request(|reply| Command::SaveVote { vote, reply })
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        self.shared.mem.write().vote = Some(vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.shared.mem.read().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<RegistryLogId>,
    ) -> Result<(), StorageError<NodeId>> {
        // Called whenever the commit index moves, so it is not waited for: the flusher writes it after the next
        // group commit (coalescing several), never before the entries it covers are durable.
        let to_err = |e: StoreError| storage_error(ErrorSubject::Store, ErrorVerb::Write, &e);
        self.shared.check().map_err(to_err)?;
        self.shared.mem.write().committed = committed;
        self.send(Command::SaveCommitted { committed })
            .map_err(to_err)
    }

    async fn read_committed(&mut self) -> Result<Option<RegistryLogId>, StorageError<NodeId>> {
        Ok(self.shared.mem.read().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = RegistryEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.append_with(entries, move |result| callback.log_io_completed(result))
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
    }

    async fn truncate(&mut self, log_id: RegistryLogId) -> Result<(), StorageError<NodeId>> {
        self.shared.mem.write().truncate_from(log_id.index);
        self.request(|reply| Command::Truncate {
            index: log_id.index,
            reply,
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: RegistryLogId) -> Result<(), StorageError<NodeId>> {
        {
            let mut mem = self.shared.mem.write();
            if mem.last_purged >= Some(log_id) {
                return Ok(());
            }
            mem.purge_upto(log_id.index);
            mem.last_purged = Some(log_id);
        }
        self.request(|reply| Command::Purge { log_id, reply })
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}

/// A segment file as the flusher knows it.
struct Segment {
    path: PathBuf,
    /// Bytes of valid records.
    len: u64,
    /// The index of the first record (meaningless while `offsets` is empty).
    first_index: u64,
    /// Each record's offset, for cutting the file at an index.
    offsets: Vec<u64>,
}

impl Segment {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            len: 0,
            first_index: 0,
            offsets: Vec::new(),
        }
    }

    fn push(&mut self, index: u64, offset: u64) {
        if self.offsets.is_empty() {
            self.first_index = index;
        }
        self.offsets.push(offset);
    }

    fn last_index(&self) -> Option<u64> {
        (!self.offsets.is_empty()).then(|| self.first_index + self.offsets.len() as u64 - 1)
    }
}

/// What replaying the segments found.
struct Replayed {
    segments: Vec<Segment>,
    /// Entries after the purged id.
    entries: VecDeque<RegistryEntry>,
    next_seq: u64,
}

/// Reads every segment in order, checking that entries are contiguous, and cuts a torn tail off the newest.
fn replay(dir: &Path, last_purged: Option<RegistryLogId>) -> Result<Replayed, StoreError> {
    let mut files = Vec::new();
    for dirent in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let dirent = dirent.map_err(io_err("list", dir))?;
        if let Some(seq) = dirent
            .file_name()
            .to_str()
            .and_then(segment::parse_segment_name)
        {
            files.push((seq, dirent.path()));
        }
    }
    files.sort();
    let next_seq = files.last().map_or(1, |(seq, _)| seq + 1);

    let mut segments = Vec::new();
    let mut entries = VecDeque::new();
    let mut prev: Option<u64> = None;
    for (k, (_, path)) in files.iter().enumerate() {
        let bytes = fs::read(path).map_err(io_err("read", path))?;
        let scan = segment::scan(&bytes);
        let mut seg = Segment::new(path.clone());
        seg.len = scan.valid_len;
        for record in &scan.records {
            let entry: RegistryEntry =
                serde_json::from_slice(record.payload).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    reason: format!("record at offset {}: {e}", record.offset),
                })?;
            let index = entry.log_id.index;
            if let Some(prev) = prev {
                if index != prev + 1 {
                    return Err(StoreError::Corrupt {
                        path: path.clone(),
                        reason: format!("entry {index} follows entry {prev}"),
                    });
                }
            }
            prev = Some(index);
            seg.push(index, record.offset);
            if last_purged.is_none_or(|p| index > p.index) {
                entries.push_back(entry);
            }
        }
        let Some(reason) = scan.bad_tail else {
            segments.push(seg);
            continue;
        };
        // Every segment is fsynced before the next one is created, so a crash can only tear the newest. Bad
        // bytes followed by more log are not a torn write but damage, and cutting them would lose entries.
        let later = &files[k + 1..];
        for (_, later_path) in later {
            let len = fs::metadata(later_path)
                .map_err(io_err("stat", later_path))?
                .len();
            if len > 0 {
                return Err(StoreError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "{reason} at offset {}, but newer segments follow",
                        scan.valid_len
                    ),
                });
            }
        }
        tracing::warn!(
            path = %path.display(),
            offset = scan.valid_len,
            dropped_bytes = bytes.len() as u64 - scan.valid_len,
            reason,
            "cutting a torn or corrupt tail off the raft log (an interrupted write)"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        file.set_len(scan.valid_len)
            .map_err(io_err("truncate", path))?;
        file.sync_all().map_err(io_err("fsync", path))?;
        for (_, later_path) in later {
            fs::remove_file(later_path).map_err(io_err("remove", later_path))?;
        }
        if !later.is_empty() {
            sync_dir(dir)?;
        }
        segments.push(seg);
        break;
    }

    if let (Some(p), Some(first)) = (last_purged, entries.front()) {
        if first.log_id.index != p.index + 1 {
            return Err(StoreError::Corrupt {
                path: dir.to_path_buf(),
                reason: format!(
                    "the log resumes at entry {} after purging up to {}",
                    first.log_id.index, p.index
                ),
            });
        }
    }
    Ok(Replayed {
        segments,
        entries,
        next_seq,
    })
}

/// The thread that owns the segment files and does every write.
struct Flusher {
    dir: PathBuf,
    segment_bytes: u64,
    /// Oldest first; the last one is appended to.
    segments: Vec<Segment>,
    next_seq: u64,
    /// An append handle on the last segment, opened when first needed.
    active: Option<File>,
    /// Whether the last segment has writes not yet fsynced.
    unsynced: bool,
    /// Callbacks of appends written but not yet fsynced.
    waiting: Vec<Done>,
    /// A committed id to persist after the next fsync.
    committed: Option<Option<RegistryLogId>>,
    shared: Arc<Shared>,
}

impl Flusher {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut committed_written = Instant::now();
        loop {
            // Wait for one command, then take whatever else queued up meanwhile (typically during the previous
            // fsync), and make the whole group durable with one fsync. While a committed id is pending, wait at
            // most until it is due.
            let first = if self.committed.is_some() {
                let due = COMMITTED_INTERVAL.saturating_sub(committed_written.elapsed());
                match rx.recv_timeout(due) {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        // The store was dropped: write the latest committed id before exiting.
                        if let Err(e) = self.persist_committed() {
                            self.fail(&e);
                        }
                        break;
                    }
                }
            } else {
                match rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => break,
                }
            };
            if let Some(first) = first {
                self.handle(first);
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(cmd) => self.handle(cmd),
                        Err(_) => break,
                    }
                }
                if let Err(e) = self.flush_log() {
                    self.fail(&e);
                    continue;
                }
            }
            // The committed id costs two more fsyncs (file and directory), so it is written at most every
            // COMMITTED_INTERVAL rather than after every group commit: a stale committed id on disk only means
            // re-applying a little less on restart. It is always written when the store is dropped.
            if self.committed.is_some() && committed_written.elapsed() >= COMMITTED_INTERVAL {
                if let Err(e) = self.persist_committed() {
                    self.fail(&e);
                }
                committed_written = Instant::now();
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        if let Some(msg) = self.shared.failure.lock().clone() {
            match cmd {
                Command::Append { done, .. } => done(Err(io::Error::other(msg))),
                Command::SaveVote { reply, .. }
                | Command::Truncate { reply, .. }
                | Command::Purge { reply, .. } => {
                    let _ = reply.send(Err(StoreError::Failed(msg)));
                }
                Command::SaveCommitted { .. } => {}
            }
            return;
        }
        match cmd {
            Command::Append { buf, records, done } => match self.write(&buf, &records) {
                Ok(()) => self.waiting.push(done),
                Err(e) => {
                    self.fail(&e);
                    done(Err(io::Error::other(e.to_string())));
                }
            },
            Command::SaveVote { vote, reply } => {
                // Appends issued before the vote become durable first: writes are applied in order.
                let result = self
                    .flush()
                    .and_then(|()| write_atomic(&self.dir, VOTE, &to_json("vote", &vote)?));
                self.finish(result, reply);
            }
            Command::SaveCommitted { committed } => self.committed = Some(committed),
            Command::Truncate { index, reply } => {
                let result = self.flush().and_then(|()| self.truncate(index));
                self.finish(result, reply);
            }
            Command::Purge { log_id, reply } => {
                let result = self.flush().and_then(|()| self.purge(log_id));
                self.finish(result, reply);
            }
        }
    }

    fn finish(&mut self, result: Result<(), StoreError>, reply: Reply) {
        if let Err(e) = &result {
            self.fail(e);
        }
        // The caller may have stopped waiting (its future dropped); the write happened regardless.
        let _ = reply.send(result);
    }

    /// Refuses every later write and fails the appends waiting for an fsync.
    fn fail(&mut self, e: &StoreError) {
        tracing::error!(dir = %self.dir.display(), error = %e, "raft log write failed; the log store stops");
        let msg = e.to_string();
        self.shared
            .failure
            .lock()
            .get_or_insert_with(|| msg.clone());
        for done in self.waiting.drain(..) {
            done(Err(io::Error::other(msg.clone())));
        }
    }

    /// Makes everything written durable, calls the waiting callbacks, then persists a pending committed id.
    fn flush(&mut self) -> Result<(), StoreError> {
        self.flush_log()?;
        self.persist_committed()
    }

    /// Makes everything written durable and calls the waiting callbacks.
    fn flush_log(&mut self) -> Result<(), StoreError> {
        self.sync_active()?;
        for done in self.waiting.drain(..) {
            done(Ok(()));
        }
        Ok(())
    }

    /// Writes the pending committed id. Only after `flush_log`: it must never point past the durable log.
    fn persist_committed(&mut self) -> Result<(), StoreError> {
        if let Some(committed) = self.committed.take() {
            write_atomic(
                &self.dir,
                COMMITTED,
                &to_json("committed log id", &committed)?,
            )?;
        }
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), StoreError> {
        if !self.unsynced {
            return Ok(());
        }
        if let (Some(file), Some(seg)) = (&self.active, self.segments.last()) {
            #[cfg(test)]
            let _gate = self.shared.fsync_gate.lock();
            // fdatasync suffices: it also flushes the file size, the only metadata needed to read records back.
            file.sync_data().map_err(io_err("fsync", &seg.path))?;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        self.unsynced = false;
        Ok(())
    }

    /// Writes records, starting a new segment whenever the current one is full.
    fn write(&mut self, buf: &[u8], records: &[(u64, u64)]) -> Result<(), StoreError> {
        let mut i = 0;
        let mut pos = 0usize;
        while i < records.len() {
            let must_rotate = match self.segments.last() {
                None => true,
                Some(seg) => seg.len > 0 && seg.len + records[i].1 > self.segment_bytes,
            };
            if must_rotate {
                self.rotate()?;
            }
            let last = self.segments.len() - 1;
            // Take every following record that fits, to write them with one call.
            let start_len = self.segments[last].len;
            let mut end_len = start_len;
            let mut j = i;
            while j < records.len() {
                let len = records[j].1;
                if j > i && end_len + len > self.segment_bytes {
                    break;
                }
                end_len += len;
                j += 1;
            }
            let start = pos;
            pos += (end_len - start_len) as usize;
            let path = self.segments[last].path.clone();
            self.active_file()?
                .write_all(&buf[start..pos])
                .map_err(io_err("write", &path))?;
            self.unsynced = true;
            let seg = &mut self.segments[last];
            let mut offset = start_len;
            for &(index, len) in &records[i..j] {
                seg.push(index, offset);
                offset += len;
            }
            seg.len = end_len;
            i = j;
        }
        Ok(())
    }

    fn active_file(&mut self) -> Result<&mut File, StoreError> {
        let file = match self.active.take() {
            Some(file) => file,
            None => {
                let path = &self.segments[self.segments.len() - 1].path;
                OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io_err("open", path))?
            }
        };
        Ok(self.active.insert(file))
    }

    /// Starts a new segment.
    fn rotate(&mut self) -> Result<(), StoreError> {
        // A segment must be complete on disk before a newer one exists: replay forgives a torn tail only in the
        // newest segment.
        self.sync_active()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = self.dir.join(segment::segment_name(seq));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        // The file's directory entry must be durable before anything written to it is acknowledged.
        sync_dir(&self.dir)?;
        self.segments.push(Segment::new(path));
        self.active = Some(file);
        Ok(())
    }

    /// Removes entries at and after `index` from the files.
    fn truncate(&mut self, index: u64) -> Result<(), StoreError> {
        // Newest first, and the directory synced before the remaining segment is cut: a crash part-way leaves a
        // shorter log, never one with a hole.
        let mut removed = false;
        while let Some(seg) = self.segments.last() {
            if !seg.offsets.is_empty() && seg.first_index < index {
                break;
            }
            self.active = None;
            fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path))?;
            self.segments.pop();
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        if let Some(seg) = self.segments.last_mut() {
            if seg.last_index().is_some_and(|last| last >= index) {
                let keep = (index - seg.first_index) as usize;
                let cut = seg.offsets[keep];
                let file = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(io_err("open", &seg.path))?;
                file.set_len(cut).map_err(io_err("truncate", &seg.path))?;
                file.sync_all().map_err(io_err("fsync", &seg.path))?;
                seg.offsets.truncate(keep);
                seg.len = cut;
            }
        }
        Ok(())
    }

    fn purge(&mut self, log_id: RegistryLogId) -> Result<(), StoreError> {
        // Recorded first: replay skips entries at or below it, so the file removals below may be interrupted.
        write_atomic(&self.dir, PURGED, &to_json("purged log id", &Some(log_id))?)?;
        self.remove_purged_segments(log_id.index)
    }

    /// Removes the segments holding only entries at or below `upto`, oldest first (a crash part-way leaves a
    /// log that still starts right after `upto`).
    fn remove_purged_segments(&mut self, upto: u64) -> Result<(), StoreError> {
        let mut removed = 0;
        while let Some(seg) = self.segments.first() {
            let purged = match seg.last_index() {
                Some(last) => last <= upto,
                // An empty segment is only worth keeping as the one being appended to.
                None => self.segments.len() > 1,
            };
            if !purged {
                break;
            }
            if self.segments.len() == 1 {
                self.active = None;
                self.unsynced = false;
            }
            fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path))?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}
