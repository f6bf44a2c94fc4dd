//! The bounded queue in front of each peer edge.
//!
//! A publish that other edges want is pushed onto one queue per interested peer and the publisher moves on; a
//! task per peer drains its queue into that peer's forward stream. When a peer is slow or partitioned its queue
//! fills and further forwards to it are dropped and counted — publishing to every other peer, and locally,
//! continues at full speed. Drops are the honest failure mode of at-most-once delivery; blocking would let one
//! bad peer stall the whole cluster.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// One publish on its way to a peer.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Target rooms, canonical JSON text.
    pub rooms: Arc<[String]>,
    /// Target users (their connections may be on any edge).
    pub users: Arc<[String]>,
    /// Target connection ids.
    pub connections: Arc<[String]>,
    /// Whether every connection is a target.
    pub all: bool,
    /// The data as published.
    pub data: Bytes,
    /// The W3C trace context the forward continues (see [`crate::trace`]), when there is one.
    pub traceparent: Option<Arc<str>>,
}

/// A bounded FIFO of forwards for one peer.
#[derive(Debug)]
pub struct PeerQueue {
    items: Mutex<VecDeque<Forward>>,
    capacity: usize,
    wake: Notify,
    dropped: AtomicU64,
}

impl PeerQueue {
    /// A queue holding at most `capacity` forwards.
    pub fn new(capacity: usize) -> Self {
        PeerQueue {
            items: Mutex::new(VecDeque::new()),
            capacity,
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a forward; `false` (and a counted drop) when the queue is full. Never waits.
    pub fn push(&self, forward: Forward) -> bool {
        let mut items = self.items.lock();
        if items.len() >= self.capacity {
            drop(items);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        items.push_back(forward);
        drop(items);
        self.wake.notify_one();
        true
    }

    /// Takes up to `max` forwards, oldest first.
    pub fn take_batch(&self, max: usize) -> Vec<Forward> {
        let mut items = self.items.lock();
        let n = items.len().min(max);
        items.drain(..n).collect()
    }

    /// Drops everything queued (the peer went away), counting it.
    pub fn discard(&self) -> usize {
        let n = {
            let mut items = self.items.lock();
            let n = items.len();
            items.clear();
            n
        };
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Forwards currently queued.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards dropped so far (queue full or peer gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Resolves once something was pushed since the last wake-up.
    pub async fn ready(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(n: u8) -> Forward {
        Forward {
            rooms: Arc::from(vec![format!("{{\"n\":{n}}}")]),
            users: Arc::from([]),
            connections: Arc::from([]),
            all: false,
            traceparent: None,
            data: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let q = PeerQueue::new(2);
        assert!(q.push(forward(1)));
        assert!(q.push(forward(2)));
        assert!(!q.push(forward(3)));
        assert_eq!(q.dropped(), 1);
        let batch = q.take_batch(10);
        assert_eq!(
            batch.iter().map(|f| f.data[0]).collect::<Vec<_>>(),
            vec![1, 2],
            "FIFO"
        );
        assert!(q.push(forward(4)), "room again after draining");
    }

    #[test]
    fn batches_are_bounded_and_discard_counts() {
        let q = PeerQueue::new(100);
        for i in 0..10 {
            q.push(forward(i));
        }
        assert_eq!(q.take_batch(4).len(), 4);
        assert_eq!(q.discard(), 6);
        assert_eq!(q.dropped(), 6);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_push_wakes_the_drainer() {
        let q = Arc::new(PeerQueue::new(10));
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                q.ready().await;
                q.take_batch(10).len()
            })
        };
        q.push(forward(1));
        assert_eq!(waiter.await.unwrap(), 1);
    }
}
