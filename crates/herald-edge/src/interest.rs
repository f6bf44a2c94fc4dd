//! Room interest as the cluster sees it: which rooms this edge has at least one local subscriber for.
//!
//! The hub reports only transitions — a room's first local subscriber arriving, its last one leaving — never
//! individual subscriptions. The tracker coalesces those transitions until the next flush: a room that gains
//! and loses its only subscriber between two flushes costs the registry nothing, and a flush carries every
//! change since the last one in one batch (one raft entry), so subscription churn on an edge never becomes one
//! raft commit per client.
//!
//! If a batch cannot be delivered, it is put back in front of whatever accumulated meanwhile ([`Self::restore`]),
//! so the registry always converges on the hub's real state once it is reachable again.

use std::collections::HashMap;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// What one room's pending change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Add,
    Remove,
}

/// A batch of interest changes to send to the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterestBatch {
    /// Canonical rooms this edge now wants.
    pub add: Vec<String>,
    /// Canonical rooms it no longer wants.
    pub remove: Vec<String>,
}

impl InterestBatch {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// The number of room changes.
    pub fn len(&self) -> usize {
        self.add.len() + self.remove.len()
    }
}

/// Collects interest transitions from the hub until they are flushed to the registry.
#[derive(Debug, Default)]
pub struct InterestTracker {
    pending: Mutex<HashMap<String, Pending>>,
    wake: Notify,
}

impl InterestTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `room` gained its first (`present = true`) or lost its last local subscriber.
    pub fn record(&self, room: String, present: bool) {
        let change = if present {
            Pending::Add
        } else {
            Pending::Remove
        };
        let mut pending = self.pending.lock();
        match pending.get(&room) {
            // The opposite transition since the last flush: the registry already has the state we are back to.
            Some(existing) if *existing != change => {
                pending.remove(&room);
            }
            _ => {
                pending.insert(room, change);
            }
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Takes up to `max` pending changes as a batch.
    pub fn take_batch(&self, max: usize) -> InterestBatch {
        let mut pending = self.pending.lock();
        let rooms: Vec<String> = pending.keys().take(max).cloned().collect();
        let mut batch = InterestBatch::default();
        for room in rooms {
            match pending.remove(&room) {
                Some(Pending::Add) => batch.add.push(room),
                Some(Pending::Remove) => batch.remove.push(room),
                None => {}
            }
        }
        batch
    }

    /// Puts back a batch that could not be delivered. It is older than anything recorded since, so a newer
    /// opposite transition cancels it, and a newer same transition (impossible: transitions alternate) wins.
    pub fn restore(&self, batch: InterestBatch) {
        let mut pending = self.pending.lock();
        for (rooms, change) in [(batch.add, Pending::Add), (batch.remove, Pending::Remove)] {
            for room in rooms {
                match pending.get(&room) {
                    Some(newer) if *newer != change => {
                        pending.remove(&room);
                    }
                    Some(_) => {}
                    None => {
                        pending.insert(room, change);
                    }
                }
            }
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Forgets everything pending: used when the edge re-registers and sends its full interest instead.
    pub fn clear(&self) {
        self.pending.lock().clear();
    }

    /// The number of rooms with a pending change.
    pub fn pending_len(&self) -> usize {
        self.pending.lock().len()
    }

    /// Resolves when something was recorded since the last call (or immediately if a wake-up is stored).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opposite_transitions_between_flushes_cancel() {
        let t = InterestTracker::new();
        t.record("a".into(), true);
        t.record("a".into(), false);
        t.record("b".into(), true);
        assert_eq!(
            t.take_batch(100),
            InterestBatch {
                add: vec!["b".into()],
                remove: vec![]
            }
        );
        assert!(t.take_batch(100).is_empty());
    }

    #[test]
    fn batches_are_bounded() {
        let t = InterestTracker::new();
        for i in 0..10 {
            t.record(format!("r{i}"), true);
        }
        assert_eq!(t.take_batch(4).len(), 4);
        assert_eq!(t.pending_len(), 6);
    }

    #[test]
    fn a_failed_batch_is_restored_under_newer_changes() {
        let t = InterestTracker::new();
        t.record("a".into(), true);
        t.record("b".into(), true);
        let failed = t.take_batch(100);
        // Meanwhile "a" lost its subscriber again and "c" appeared.
        t.record("a".into(), false);
        t.record("c".into(), true);
        t.restore(failed);
        let mut batch = t.take_batch(100);
        batch.add.sort();
        // "a": added (failed) then removed (newer) = never reached the registry, nothing to send.
        assert_eq!(
            batch,
            InterestBatch {
                add: vec!["b".into(), "c".into()],
                remove: vec![]
            }
        );
    }
}
