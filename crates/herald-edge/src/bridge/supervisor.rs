//! Supervision of long-running tasks, as Zephserver's service manager did: a task that fails (returns an error
//! or panics) is restarted after a backoff that doubles up to a ceiling, and its state is kept where metrics and
//! operators can read it. A failing bridge costs its own restarts and nothing else: it runs as its own tokio
//! task, so even a panic ends only that task.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// The first restart's delay.
pub(crate) const MIN_RESTART_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between restarts.
pub(crate) const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A task that ran this long before failing starts again from the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// What one run of a supervised task returns: `Ok` when it stopped because it was cancelled, `Err` with the
/// reason otherwise.
pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A supervised task's state, for `/metrics` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskStatus {
    /// Running now.
    pub(crate) up: bool,
    /// Restarts since the task was started.
    pub(crate) restarts: u64,
    /// The last failure.
    pub(crate) last_error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    stop: CancellationToken,
    status: Arc<Mutex<TaskStatus>>,
}

/// Named supervised tasks.
#[derive(Debug, Default)]
pub(crate) struct Supervisor {
    tasks: Mutex<BTreeMap<String, Entry>>,
}

impl Supervisor {
    /// Starts `name` (replacing a task of that name): `run` is called for each (re)start with a token that is
    /// cancelled when the task should stop.
    pub(crate) fn start<F>(&self, name: &str, run: F)
    where
        F: Fn(CancellationToken) -> TaskFuture + Send + Sync + 'static,
    {
        self.stop(name);
        let stop = CancellationToken::new();
        let status = Arc::new(Mutex::new(TaskStatus {
            up: false,
            restarts: 0,
            last_error: None,
        }));
        self.tasks.lock().insert(
            name.to_owned(),
            Entry {
                stop: stop.clone(),
                status: status.clone(),
            },
        );
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut delay = MIN_RESTART_DELAY;
            while !stop.is_cancelled() {
                status.lock().up = true;
                let started = Instant::now();
                // Its own task, so a panic is a JoinError here instead of the end of the supervisor.
                let outcome = tokio::spawn(run(stop.child_token())).await;
                status.lock().up = false;
                if stop.is_cancelled() {
                    break;
                }
                let reason = match outcome {
                    Ok(Ok(())) => "stopped on its own".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) if e.is_panic() => "panicked".to_owned(),
                    Err(e) => e.to_string(),
                };
                if started.elapsed() >= HEALTHY_RUN {
                    delay = MIN_RESTART_DELAY;
                }
                tracing::warn!(task = %name, cause = %reason, retry_in_ms = delay.as_millis() as u64, "supervised task failed; restarting");
                {
                    let mut s = status.lock();
                    s.restarts += 1;
                    s.last_error = Some(reason);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
                delay = (delay * 2).min(MAX_RESTART_DELAY);
            }
        });
    }

    /// Stops `name` if it runs.
    pub(crate) fn stop(&self, name: &str) {
        if let Some(entry) = self.tasks.lock().remove(name) {
            entry.stop.cancel();
        }
    }

    /// Stops every task.
    pub(crate) fn stop_all(&self) {
        for (_, entry) in std::mem::take(&mut *self.tasks.lock()) {
            entry.stop.cancel();
        }
    }

    /// The names of the tasks started and not stopped.
    pub(crate) fn names(&self) -> Vec<String> {
        self.tasks.lock().keys().cloned().collect()
    }

    /// Every task's status, by name.
    pub(crate) fn statuses(&self) -> BTreeMap<String, TaskStatus> {
        self.tasks
            .lock()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.status.lock().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn failures_and_panics_restart_with_growing_delays() {
        let supervisor = Supervisor::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        supervisor.start("flaky", move |stop| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match n {
                    0 => Err("refused".to_owned()),
                    1 => panic!("bridge bug"),
                    _ => {
                        stop.cancelled().await;
                        Ok(())
                    }
                }
            })
        });
        // Run 0 fails at once, run 1 after 100 ms, run 2 after another 200 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let status = supervisor.statuses()["flaky"].clone();
        assert_eq!(
            status,
            TaskStatus {
                up: true,
                restarts: 2,
                last_error: Some("panicked".into())
            }
        );
        supervisor.stop("flaky");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "a stopped task is not restarted"
        );
        assert!(supervisor.statuses().is_empty());
    }
}
