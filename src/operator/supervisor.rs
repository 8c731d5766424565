//! The one owner of pair tasks: at most one task per key; stop = cancel, then a deadline,
//! then abort, and a replacement starts only after the old task has exited; a failed task is
//! restarted after a per-key jittered backoff that resets once it has run healthy for a while.
//! Failures and restarts go to `pair_status`. What to run is decided by `plan()`, not here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::desired::PairSpec;
use super::status::{phase, StatusHub};
use crate::market::PairKey;

/// Restart policy (from `app.operator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub stop_timeout: Duration,
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    pub healthy_after: Duration,
}

/// Builds the future of one run of a pair task; it returns when cancelled (`Ok`) or failed.
pub type Factory = Arc<
    dyn Fn(PairKey, PairSpec, CancellationToken) -> BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

struct Slot {
    spec: PairSpec,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

pub struct Supervisor {
    slots: BTreeMap<PairKey, Slot>,
    factory: Factory,
    policy: Arc<std::sync::RwLock<Policy>>,
    status: StatusHub,
    root: CancellationToken,
}

impl Supervisor {
    pub fn new(
        factory: Factory,
        policy: Policy,
        status: StatusHub,
        root: CancellationToken,
    ) -> Self {
        Supervisor {
            slots: BTreeMap::new(),
            factory,
            policy: Arc::new(std::sync::RwLock::new(policy)),
            status,
            root,
        }
    }

    /// Applies a changed restart policy to running and future tasks.
    pub fn set_policy(&self, policy: Policy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    fn policy(&self) -> Policy {
        *self
            .policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What runs now, with the spec each task was started with.
    pub fn running(&self) -> BTreeMap<PairKey, PairSpec> {
        self.slots
            .iter()
            .map(|(k, s)| (k.clone(), s.spec))
            .collect()
    }

    pub fn start(&mut self, key: PairKey, spec: PairSpec) {
        if self.slots.contains_key(&key) {
            return;
        }
        let cancel = self.root.child_token();
        let handle = tokio::spawn(keep_running(
            key.clone(),
            spec,
            self.factory.clone(),
            self.policy.clone(),
            self.status.clone(),
            cancel.clone(),
        ));
        info!(pair = %key, "Pair task started.");
        self.slots.insert(
            key,
            Slot {
                spec,
                cancel,
                handle,
            },
        );
    }

    /// Stops these tasks (all cancelled at once, then each awaited up to the deadline).
    pub async fn stop(&mut self, keys: &[PairKey]) {
        let timeout = self.policy().stop_timeout;
        let slots: Vec<(PairKey, Slot)> = keys
            .iter()
            .filter_map(|k| self.slots.remove(k).map(|s| (k.clone(), s)))
            .collect();
        for (_, s) in &slots {
            s.cancel.cancel();
        }
        // One deadline for all of them: stopping N tasks takes at most `timeout`, not N times.
        let deadline = Instant::now() + timeout;
        for (k, s) in slots {
            let mut handle = s.handle;
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                warn!(pair = %k, ?timeout, "Pair task did not stop in time; aborting it.");
                handle.abort();
                let _ = handle.await;
            }
            info!(pair = %k, "Pair task stopped.");
        }
    }

    pub async fn stop_all(&mut self) {
        let keys: Vec<PairKey> = self.slots.keys().cloned().collect();
        self.stop(&keys).await;
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one key's task again and again until cancelled, backing off between failures.
async fn keep_running(
    key: PairKey,
    spec: PairSpec,
    factory: Factory,
    policy: Arc<std::sync::RwLock<Policy>>,
    status: StatusHub,
    cancel: CancellationToken,
) {
    let mut attempt: u32 = 0;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let started = Instant::now();
        // Run in its own task so that a panic is a failure of this key, not of the supervisor.
        // If this loop is aborted at the stop deadline, the guard aborts the run with it.
        let mut run = AbortOnDrop(tokio::spawn(factory(
            key.clone(),
            spec,
            cancel.child_token(),
        )));
        let result = tokio::select! {
            r = &mut run.0 => r,
            _ = cancel.cancelled() => {
                // The run sees the same cancellation; the supervisor's stop deadline applies.
                (&mut run.0).await
            }
        };
        let error = match result {
            Ok(Ok(())) => {
                if cancel.is_cancelled() {
                    return;
                }
                "the task ended without being asked to".to_string()
            }
            Ok(Err(e)) => e,
            Err(e) if e.is_panic() => "the task panicked".to_string(),
            Err(_) => return,
        };
        if cancel.is_cancelled() {
            return;
        }
        let p = *policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if started.elapsed() >= p.healthy_after {
            attempt = 0;
        }
        let delay = crate::backoff::delay(
            attempt,
            p.restart_backoff,
            p.max_restart_backoff,
            &mut rand::rng(),
        );
        attempt = attempt.saturating_add(1);
        warn!(pair = %key, %error, retry_in = ?delay, "Pair task failed; restarting.");
        status.update(&key, |r| {
            r.phase = phase::ERROR.into();
            r.last_error = error.clone();
            r.restarts += 1;
        });
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn policy() -> Policy {
        Policy {
            stop_timeout: Duration::from_secs(1),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(8),
            healthy_after: Duration::from_secs(60),
        }
    }

    /// A task that fails `fail_first` times right away, then runs until cancelled (or, with
    /// `then_fail_after`, fails again after running that long).
    fn factory(
        starts: Arc<Mutex<Vec<Instant>>>,
        fail_first: usize,
        then_fail_after: Option<Duration>,
    ) -> Factory {
        Arc::new(move |_, _, cancel: CancellationToken| {
            let starts = starts.clone();
            Box::pin(async move {
                let n = {
                    let mut s = starts.lock().unwrap();
                    s.push(Instant::now());
                    s.len()
                };
                if n <= fail_first {
                    return Err(format!("failure {n}"));
                }
                match then_fail_after {
                    Some(d) => tokio::select! {
                        _ = cancel.cancelled() => Ok(()),
                        _ = tokio::time::sleep(d) => Err("late failure".to_string()),
                    },
                    None => {
                        cancel.cancelled().await;
                        Ok(())
                    }
                }
            })
        })
    }

    async fn wait_for_starts(starts: &Arc<Mutex<Vec<Instant>>>, n: usize) {
        while starts.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_with_jitter_and_show_in_status() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let status = StatusHub::default();
        let mut sup = Supervisor::new(
            factory(starts.clone(), 4, None),
            policy(),
            status.clone(),
            CancellationToken::new(),
        );
        let key = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let spec = PairSpec {
            backfill_from: 0,
            stream: true,
        };
        sup.start(key.clone(), spec);
        sup.start(key.clone(), spec); // at most one task per key
        wait_for_starts(&starts, 5).await;
        let s = starts.lock().unwrap().clone();
        let gaps: Vec<Duration> = s.windows(2).map(|w| w[1] - w[0]).collect();
        // Full jitter in [cap/2, cap] with caps 1, 2, 4, 8 s.
        for (gap, cap) in gaps.iter().zip([1u64, 2, 4, 8]) {
            let cap = Duration::from_secs(cap);
            assert!(
                *gap >= cap / 2 && *gap <= cap + Duration::from_millis(20),
                "{gaps:?}"
            );
        }
        let row = status.get(&key).unwrap();
        assert_eq!((row.phase.as_str(), row.restarts), ("error", 4));
        assert_eq!(row.last_error, "failure 4");
        assert_eq!(sup.running().len(), 1);
        sup.stop_all().await;
        assert!(sup.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_resets_after_a_healthy_run() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut sup = Supervisor::new(
            factory(starts.clone(), 3, Some(Duration::from_secs(120))),
            policy(),
            StatusHub::default(),
            CancellationToken::new(),
        );
        sup.start(
            PairKey::parse("um", "BTCUSDT", "1m").unwrap(),
            PairSpec {
                backfill_from: 0,
                stream: true,
            },
        );
        wait_for_starts(&starts, 5).await;
        let s = starts.lock().unwrap().clone();
        // Runs 1-3 fail at once (1, 2, 4 s caps); run 4 ran 120 s (healthy) then failed:
        // the next delay is back at the first cap (<= 1 s), not 8 s.
        let last = s[4] - s[3] - Duration::from_secs(120);
        assert!(last <= Duration::from_millis(1020), "{last:?}");
        sup.stop_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_cancellation_is_aborted_at_the_deadline() {
        let started = Arc::new(Mutex::new(0));
        let s2 = started.clone();
        let f: Factory = Arc::new(move |_, _, _cancel| {
            let s2 = s2.clone();
            Box::pin(async move {
                *s2.lock().unwrap() += 1;
                std::future::pending::<()>().await;
                Ok(())
            })
        });
        let mut sup = Supervisor::new(f, policy(), StatusHub::default(), CancellationToken::new());
        let key = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        sup.start(
            key.clone(),
            PairSpec {
                backfill_from: 0,
                stream: true,
            },
        );
        while *started.lock().unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        sup.stop(&[key]).await;
        let took = t.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        assert!(sup.running().is_empty());
    }
}
