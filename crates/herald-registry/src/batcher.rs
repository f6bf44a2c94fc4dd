//! Group commit for interest updates: many edges' changes, one raft entry.
//!
//! Each `UpdateInterest` call queues its change and waits. A single flusher takes everything queued — up to
//! [`MAX_BATCH_CHANGES`] room changes — proposes it as one `Request::Interest`, and answers every waiting
//! caller from the one response. While a proposal is in flight the next batch accumulates, so the batch size
//! grows with the load and the commit rate stays bounded: 64 edges each sending a change do not make 64
//! raft commits.

use std::future::Future;
use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::types::{InterestChange, Request, Response};

/// The most room changes one raft entry carries.
pub const MAX_BATCH_CHANGES: usize = 4096;

/// What a caller gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Committed at this revision.
    Committed(u64),
    /// The edge is not registered; nothing was applied for it.
    UnknownEdge,
    /// The proposal failed (not leader, no quorum, shutting down).
    Failed(String),
}

struct Waiting {
    change: InterestChange,
    reply: oneshot::Sender<BatchOutcome>,
}

/// Queues interest changes for the flusher.
#[derive(Clone, Default)]
pub struct InterestBatcher {
    queue: Arc<Mutex<Vec<Waiting>>>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for InterestBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterestBatcher")
            .field("queued", &self.queue.lock().len())
            .finish()
    }
}

impl InterestBatcher {
    /// An empty batcher; run [`Self::run`] to flush it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues one edge's change and waits for the batch it lands in to commit.
    pub async fn submit(&self, change: InterestChange) -> BatchOutcome {
        let (reply, answer) = oneshot::channel();
        self.queue.lock().push(Waiting { change, reply });
        self.wake.notify_one();
        answer
            .await
            .unwrap_or_else(|_| BatchOutcome::Failed("registry shutting down".into()))
    }

    /// Flushes batches through `propose` until `shutdown` resolves, with up to `max_in_flight` proposals
    /// outstanding; every caller is answered from the entry its change landed in. The order of two batches in
    /// flight does not matter: changes from different edges commute, and an edge has one update in flight.
    pub async fn run<P, F>(
        self,
        propose: P,
        max_in_flight: usize,
        shutdown: impl Future<Output = ()>,
    ) where
        P: Fn(Request) -> F,
        F: Future<Output = Result<Response, String>>,
    {
        let max_in_flight = max_in_flight.max(1);
        tokio::pin!(shutdown);
        let mut in_flight = FuturesOrdered::new();
        loop {
            while in_flight.len() < max_in_flight {
                let batch = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                // The changes move into the entry; only each caller's edge id stays behind to answer it.
                let mut callers = Vec::with_capacity(batch.len());
                let changes: Arc<[InterestChange]> = batch
                    .into_iter()
                    .map(|waiting| {
                        callers.push((waiting.change.edge.clone(), waiting.reply));
                        waiting.change
                    })
                    .collect();
                let proposal = propose(Request::Interest { changes });
                in_flight.push_back(async move { (proposal.await, callers) });
            }
            tokio::select! {
                Some((outcome, callers)) = in_flight.next(), if !in_flight.is_empty() => {
                    answer(&outcome, callers);
                }
                _ = self.wake.notified(), if in_flight.len() < max_in_flight => {}
                _ = &mut shutdown => return,
            }
        }
    }

    fn take_batch(&self) -> Vec<Waiting> {
        let mut queue = self.queue.lock();
        let mut size = 0;
        let mut take = 0;
        for waiting in queue.iter() {
            let n = waiting.change.add.len() + waiting.change.remove.len();
            // Always take at least one, however large, so an oversized change cannot wedge the queue.
            if take > 0 && size + n > MAX_BATCH_CHANGES {
                break;
            }
            size += n;
            take += 1;
        }
        queue.drain(..take).collect()
    }
}

fn answer(
    outcome: &Result<Response, String>,
    callers: Vec<(String, oneshot::Sender<BatchOutcome>)>,
) {
    for (edge, reply) in callers {
        let answer = match outcome {
            Ok(response) if response.unknown_edges.contains(&edge) => BatchOutcome::UnknownEdge,
            Ok(response) => BatchOutcome::Committed(response.revision),
            Err(e) => BatchOutcome::Failed(e.clone()),
        };
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn change(edge: &str, room: &str) -> InterestChange {
        InterestChange {
            edge: edge.into(),
            add: vec![room.into()],
            remove: vec![],
        }
    }

    #[tokio::test]
    async fn concurrent_updates_share_proposals() {
        let batcher = InterestBatcher::new();
        let proposals = Arc::new(AtomicUsize::new(0));
        let counted = proposals.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn(batcher.clone().run(
            move |request| {
                counted.fetch_add(1, Ordering::Relaxed);
                async move {
                    // A slow commit, so later submissions pile up behind it.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let Request::Interest { changes } = request else {
                        unreachable!()
                    };
                    Ok(Response {
                        revision: changes.len() as u64,
                        unknown_edges: changes
                            .iter()
                            .filter(|c| c.edge == "ghost")
                            .map(|c| c.edge.clone())
                            .collect(),
                        ..Response::default()
                    })
                }
            },
            1,
            async {
                let _ = stopped.await;
            },
        ));
        let mut waiters = Vec::new();
        for i in 0..64 {
            let b = batcher.clone();
            let edge = if i == 7 {
                "ghost".to_string()
            } else {
                format!("e{i}")
            };
            waiters.push(tokio::spawn(
                async move { b.submit(change(&edge, "r")).await },
            ));
        }
        let mut unknown = 0;
        for w in waiters {
            match w.await.unwrap() {
                BatchOutcome::Committed(_) => {}
                BatchOutcome::UnknownEdge => unknown += 1,
                BatchOutcome::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(unknown, 1);
        let n = proposals.load(Ordering::Relaxed);
        assert!((1..64).contains(&n), "64 updates took {n} proposals");
        let _ = stop.send(());
        runner.await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_proposal_fails_every_caller_in_it() {
        let batcher = InterestBatcher::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn(batcher.clone().run(
            |_| async { Err("not the leader".to_string()) },
            1,
            async {
                let _ = stopped.await;
            },
        ));
        assert_eq!(
            batcher.submit(change("a", "r")).await,
            BatchOutcome::Failed("not the leader".into())
        );
        let _ = stop.send(());
        runner.await.unwrap();
    }

    #[tokio::test]
    async fn up_to_max_in_flight_proposals_overlap_and_every_caller_is_answered() {
        let batcher = InterestBatcher::new();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn(batcher.clone().run(
            move |request| {
                let (r, m) = (r.clone(), m.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    let Request::Interest { changes } = request else {
                        unreachable!()
                    };
                    Ok(Response {
                        revision: changes.len() as u64,
                        ..Response::default()
                    })
                }
            },
            2,
            async {
                let _ = stopped.await;
            },
        ));
        let mut waiters = Vec::new();
        for i in 0..40 {
            let b = batcher.clone();
            waiters.push(tokio::spawn(async move {
                b.submit(change(&format!("e{i}"), "r")).await
            }));
            // Spread the submissions so they land in several batches.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        for w in waiters {
            assert!(matches!(w.await.unwrap(), BatchOutcome::Committed(_)));
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "two proposals overlapped, never three"
        );
        let _ = stop.send(());
        runner.await.unwrap();
    }
}
