//! The one owner of every long-lived task of a generation, Vector-style: nothing long-lived is
//! spawned without an owner that notices its death.
//!
//! Two kinds of children:
//! - keyed tasks ([`TaskKey`] → [`TaskSpec`], what the reconcile loop declares): at most one per
//!   key; stop = cancel, then a deadline, then abort, and a replacement starts only after the
//!   old task has exited. A retryable failure restarts the task after a per-key jittered
//!   backoff that resets once it has run healthy for a while; a permanent one parks it
//!   (reported, not retried) until its spec changes. Failures show in `pair_status`.
//! - services (the live sink, the status flusher, proxy health checks, …): one run of each,
//!   restarted with backoff when it fails ([`OnFailure::Restart`]), or, when its loss cannot be
//!   repaired in-process ([`OnFailure::Fatal`]), raising the [`Fatal`] signal so the process
//!   shuts down and systemd starts it again. Never a silent stop. Their state is in
//!   `task_status`.
//!
//! Every run executes in a task of its own, so a panic is that run's failure (a value), not the
//! supervisor's. Failures are logged, counted (`task_failures` in the metrics line) and
//! reflected in observed state. What to run is decided by `plan()`, not here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::status::{phase, task_state, StatusHub};
use crate::tasks::{TaskError, TaskKey, TaskSpec};

/// Restart policy (from `app.operator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub stop_timeout: Duration,
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    pub healthy_after: Duration,
}

/// One run of a task: it returns when cancelled (`Ok`) or failed.
pub type Run = BoxFuture<'static, Result<(), TaskError>>;

/// Builds the future of one run of a keyed task.
pub type Factory = Arc<dyn Fn(TaskKey, TaskSpec, CancellationToken) -> Run + Send + Sync>;

/// Builds the future of one run of a service.
pub type ServiceFactory = Arc<dyn Fn(CancellationToken) -> Run + Send + Sync>;

/// What a service's failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Restart it after a backoff (its state survives outside the run, or is rebuilt).
    Restart,
    /// The process cannot go on correctly without it: raise [`Fatal`].
    Fatal,
}

/// Raised when a task whose loss is fatal has failed; the runtime shuts the process down
/// with the reason, exiting non-zero so the service manager restarts it.
#[derive(Clone, Default)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Fatal {
    /// Records the first reason and wakes whoever waits in [`Fatal::raised`].
    pub fn raise(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason);
        }
        self.token.cancel();
    }

    /// Waits until raised; returns the reason.
    pub async fn raised(&self) -> String {
        self.token.cancelled().await;
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }
}

struct Slot {
    spec: TaskSpec,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

struct ServiceSlot {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// A child being stopped: its name in the log, its token and its handle.
type Stopping = (String, CancellationToken, JoinHandle<()>);

/// Keyed tasks parked by a permanent error (until their spec changes).
type Parked = Arc<Mutex<BTreeSet<TaskKey>>>;

pub struct Supervisor {
    slots: BTreeMap<TaskKey, Slot>,
    parked: Parked,
    services: BTreeMap<&'static str, ServiceSlot>,
    factory: Factory,
    policy: Arc<std::sync::RwLock<Policy>>,
    status: StatusHub,
    root: CancellationToken,
    fatal: Fatal,
}

/// Where a child's failures are reported.
#[derive(Clone)]
enum Owner {
    Keyed(TaskKey),
    Service(&'static str, OnFailure),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Keyed(k) => k.fmt(f),
            Owner::Service(name, _) => write!(f, "task {name}"),
        }
    }
}

impl Supervisor {
    pub fn new(
        factory: Factory,
        policy: Policy,
        status: StatusHub,
        root: CancellationToken,
        fatal: Fatal,
    ) -> Self {
        Supervisor {
            slots: BTreeMap::new(),
            parked: Parked::default(),
            services: BTreeMap::new(),
            factory,
            policy: Arc::new(std::sync::RwLock::new(policy)),
            status,
            root,
            fatal,
        }
    }

    /// A supervisor of services only (the daemon's own, which outlive the generations): it
    /// has no keyed tasks to build.
    pub fn services_only(
        policy: Policy,
        status: StatusHub,
        root: CancellationToken,
        fatal: Fatal,
    ) -> Self {
        let factory: Factory = Arc::new(|key, _, _| {
            Box::pin(async move {
                Err(TaskError::Permanent(format!(
                    "{key}: this supervisor runs services only"
                )))
            })
        });
        Supervisor::new(factory, policy, status, root, fatal)
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

    /// What keyed tasks run now, with the spec each was started with (parked ones included:
    /// they count as running their spec until it changes).
    pub fn running(&self) -> BTreeMap<TaskKey, TaskSpec> {
        self.slots
            .iter()
            .map(|(k, s)| (k.clone(), s.spec.clone()))
            .collect()
    }

    /// The keyed tasks parked by a permanent error: they run nothing, and what they would
    /// have needed (a stream, say) must not be kept up for them either.
    pub fn parked(&self) -> BTreeSet<TaskKey> {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn start(&mut self, key: TaskKey, spec: TaskSpec) {
        if self.slots.contains_key(&key) {
            return;
        }
        let factory = self.factory.clone();
        let (k, s) = (key.clone(), spec.clone());
        let make: ServiceFactory = Arc::new(move |c| factory(k.clone(), s.clone(), c));
        let (cancel, handle) = self.spawn_child(Owner::Keyed(key.clone()), make);
        info!(task = %key, "Task started.");
        self.slots.insert(
            key,
            Slot {
                spec,
                cancel,
                handle,
            },
        );
    }

    /// Starts a service of this generation under `name` (once; a second call is ignored).
    pub fn start_service(&mut self, name: &'static str, on_failure: OnFailure, f: ServiceFactory) {
        if self.services.contains_key(name) {
            return;
        }
        self.status.update_task(name, |r| {
            r.state = task_state::RUNNING.into();
        });
        let (cancel, handle) = self.spawn_child(Owner::Service(name, on_failure), f);
        self.services.insert(name, ServiceSlot { cancel, handle });
    }

    /// Runs `make` under `owner`'s policy until its token (returned) is cancelled.
    fn spawn_child(
        &self,
        owner: Owner,
        make: ServiceFactory,
    ) -> (CancellationToken, JoinHandle<()>) {
        let cancel = self.root.child_token();
        let handle = tokio::spawn(keep_running(
            owner,
            make,
            self.policy.clone(),
            self.status.clone(),
            self.fatal.clone(),
            self.parked.clone(),
            cancel.clone(),
        ));
        (cancel, handle)
    }

    /// Stops these keyed tasks (all cancelled at once, then each awaited up to the deadline).
    pub async fn stop(&mut self, keys: &[TaskKey]) {
        let slots: Vec<Stopping> = keys
            .iter()
            .filter_map(|k| {
                self.slots
                    .remove(k)
                    .map(|s| (k.to_string(), s.cancel, s.handle))
            })
            .collect();
        self.stop_slots(slots).await;
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        for k in keys {
            parked.remove(k);
        }
    }

    /// Stops everything: keyed tasks and services.
    pub async fn stop_all(&mut self) {
        let mut slots: Vec<Stopping> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|(k, s)| (k.to_string(), s.cancel, s.handle))
            .collect();
        slots.extend(
            std::mem::take(&mut self.services)
                .into_iter()
                .map(|(k, s)| (format!("task {k}"), s.cancel, s.handle)),
        );
        self.stop_slots(slots).await;
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Stops only the services named (the others keep running).
    pub async fn stop_services(&mut self, names: &[&'static str]) {
        let slots: Vec<Stopping> = names
            .iter()
            .filter_map(|n| {
                self.services
                    .remove(n)
                    .map(|s| (format!("task {n}"), s.cancel, s.handle))
            })
            .collect();
        self.stop_slots(slots).await;
    }

    async fn stop_slots(&mut self, slots: Vec<Stopping>) {
        let timeout = self.policy().stop_timeout;
        for (_, cancel, _) in &slots {
            cancel.cancel();
        }
        // One deadline for all of them: stopping N tasks takes at most `timeout`, not N times.
        let deadline = Instant::now() + timeout;
        for (k, _, mut handle) in slots {
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                warn!(task = %k, ?timeout, "Task did not stop in time; aborting it.");
                handle.abort();
                let _ = handle.await;
            }
            info!(task = %k, "Task stopped.");
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one child again and again until cancelled; see the module comment for the policy.
async fn keep_running(
    owner: Owner,
    make: ServiceFactory,
    policy: Arc<std::sync::RwLock<Policy>>,
    status: StatusHub,
    fatal: Fatal,
    parked: Parked,
    cancel: CancellationToken,
) {
    let mut attempt: u32 = 0;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let started = Instant::now();
        // Run in its own task so that a panic is a failure of this child, not of the
        // supervisor. If this loop is aborted at the stop deadline, the guard aborts the run.
        let mut run = AbortOnDrop(tokio::spawn(make(cancel.child_token())));
        let result = tokio::select! {
            r = &mut run.0 => r,
            _ = cancel.cancelled() => {
                // The run sees the same cancellation; the supervisor's stop deadline applies.
                (&mut run.0).await
            }
        };
        if cancel.is_cancelled() {
            if let Err(e) = result {
                if e.is_panic() {
                    warn!(task = %owner, error = %crate::join_error_text(e), "Task panicked while stopping.");
                }
            }
            return;
        }
        let error = match result {
            Ok(Ok(())) => TaskError::Retryable("the task ended without being asked to".into()),
            Ok(Err(e)) => e,
            Err(e) => TaskError::Retryable(crate::join_error_text(e)),
        };
        crate::metrics::add(&crate::metrics::TASK_FAILURES, 1);
        let fatal_loss = match &owner {
            Owner::Service(_, OnFailure::Fatal) => true,
            // A service has no spec that could change: a permanent error is fatal too.
            Owner::Service(_, OnFailure::Restart) => !error.is_retryable(),
            Owner::Keyed(_) => false,
        };
        if fatal_loss {
            error!(task = %owner, %error, "A task the daemon cannot run without failed; shutting down.");
            if let Owner::Service(name, _) = &owner {
                status.update_task(name, |r| {
                    r.state = task_state::FAILED.into();
                    r.last_error = error.to_string();
                });
            }
            fatal.raise(format!("{owner} failed: {error}"));
            return;
        }
        if !error.is_retryable() {
            error!(task = %owner, %error, "Task failed permanently; parked until its spec changes.");
            if let Owner::Keyed(k) = &owner {
                parked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(k.clone());
                if let Some(pair) = k.pair() {
                    status.update(pair, |r| {
                        r.phase = phase::PARKED.into();
                        r.last_error = error.to_string();
                    });
                }
            }
            cancel.cancelled().await;
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
        warn!(task = %owner, %error, retry_in = ?delay, "Task failed; restarting.");
        match &owner {
            Owner::Keyed(k) => {
                if let Some(pair) = k.pair() {
                    status.update(pair, |r| {
                        r.phase = phase::ERROR.into();
                        r.last_error = error.to_string();
                        r.restarts += 1;
                    });
                }
            }
            Owner::Service(name, _) => status.update_task(name, |r| {
                r.state = task_state::RESTARTING.into();
                r.last_error = error.to_string();
                r.restarts += 1;
            }),
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        if let Owner::Service(name, _) = &owner {
            status.update_task(name, |r| r.state = task_state::RUNNING.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::PairKey;
    use crate::tasks::PairSpec;
    use std::sync::Mutex;

    fn policy() -> Policy {
        Policy {
            stop_timeout: Duration::from_secs(1),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(8),
            healthy_after: Duration::from_secs(60),
        }
    }

    fn key() -> TaskKey {
        TaskKey::Pair(PairKey::parse("um", "BTCUSDT", "1m").unwrap())
    }

    fn spec(from: i64) -> TaskSpec {
        TaskSpec::Pair(PairSpec {
            backfill_from: from,
            stream: true,
        })
    }

    fn sup(f: Factory, status: StatusHub) -> Supervisor {
        Supervisor::new(
            f,
            policy(),
            status,
            CancellationToken::new(),
            Fatal::default(),
        )
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
                    return Err(TaskError::Retryable(format!("failure {n}")));
                }
                match then_fail_after {
                    Some(d) => tokio::select! {
                        _ = cancel.cancelled() => Ok(()),
                        _ = tokio::time::sleep(d) => Err(TaskError::Retryable("late failure".into())),
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
        let mut sup = sup(factory(starts.clone(), 4, None), status.clone());
        sup.start(key(), spec(0));
        sup.start(key(), spec(0)); // at most one task per key
        wait_for_starts(&starts, 5).await;
        let s = starts.lock().unwrap().clone();
        let gaps: Vec<Duration> = s.windows(2).map(|w| w[1] - w[0]).collect();
        // Equal jitter in [cap/2, cap] with caps 1, 2, 4, 8 s.
        for (gap, cap) in gaps.iter().zip([1u64, 2, 4, 8]) {
            let cap = Duration::from_secs(cap);
            assert!(
                *gap >= cap / 2 && *gap <= cap + Duration::from_millis(20),
                "{gaps:?}"
            );
        }
        let row = status.get(key().pair().unwrap()).unwrap();
        assert_eq!((row.phase.as_str(), row.restarts), ("error", 4));
        assert_eq!(row.last_error, "failure 4");
        assert_eq!(sup.running().len(), 1);
        sup.stop_all().await;
        assert!(sup.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_resets_after_a_healthy_run() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut sup = sup(
            factory(starts.clone(), 3, Some(Duration::from_secs(120))),
            StatusHub::default(),
        );
        sup.start(key(), spec(0));
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
        let mut sup = sup(f, StatusHub::default());
        sup.start(key(), spec(0));
        while *started.lock().unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        sup.stop(&[key()]).await;
        let took = t.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        assert!(sup.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_parks_the_task_until_its_spec_changes() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s2 = starts.clone();
        let f: Factory = Arc::new(move |_, spec, cancel: CancellationToken| {
            let s2 = s2.clone();
            Box::pin(async move {
                s2.lock().unwrap().push(Instant::now());
                if spec == self::spec(0) {
                    return Err(TaskError::Permanent("unknown symbol BTCUSDT".into()));
                }
                cancel.cancelled().await;
                Ok(())
            })
        });
        let status = StatusHub::default();
        let mut sup = sup(f, status.clone());
        sup.start(key(), spec(0));
        wait_for_starts(&starts, 1).await;
        // Far longer than any backoff: a parked task is never restarted.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(starts.lock().unwrap().len(), 1);
        let row = status.get(key().pair().unwrap()).unwrap();
        assert_eq!(
            (row.phase.as_str(), row.restarts, row.last_error.as_str()),
            ("parked", 0, "unknown symbol BTCUSDT")
        );
        // Still "running" its spec, so plan() leaves it alone until the spec changes.
        assert_eq!(sup.running().get(&key()), Some(&spec(0)));
        assert_eq!(sup.parked(), BTreeSet::from([key()]));
        sup.stop(&[key()]).await;
        assert!(
            sup.parked().is_empty(),
            "a stopped task is no longer parked"
        );
        sup.start(key(), spec(5));
        wait_for_starts(&starts, 2).await;
        sup.stop_all().await;
    }

    /// A service that panics on its first `panics` runs, then runs until cancelled.
    fn panicking_service(runs: Arc<Mutex<u32>>, panics: u32) -> ServiceFactory {
        Arc::new(move |cancel: CancellationToken| {
            let runs = runs.clone();
            Box::pin(async move {
                let n = {
                    let mut r = runs.lock().unwrap();
                    *r += 1;
                    *r
                };
                if n <= panics {
                    panic!("injected panic {n}");
                }
                cancel.cancelled().await;
                Ok(())
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_panics_is_restarted_and_its_failures_are_observed() {
        let runs = Arc::new(Mutex::new(0));
        let status = StatusHub::default();
        let fatal = Fatal::default();
        let mut sup = Supervisor::new(
            factory(Arc::default(), 0, None),
            policy(),
            status.clone(),
            CancellationToken::new(),
            fatal.clone(),
        );
        let before = crate::metrics::TASK_FAILURES.load(std::sync::atomic::Ordering::Relaxed);
        sup.start_service(
            "live_sink",
            OnFailure::Restart,
            panicking_service(runs.clone(), 2),
        );
        while *runs.lock().unwrap() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let row = status.task("live_sink").unwrap();
        assert_eq!((row.state.as_str(), row.restarts), ("running", 2));
        assert_eq!(row.last_error, "the task panicked: injected panic 2");
        let after = crate::metrics::TASK_FAILURES.load(std::sync::atomic::Ordering::Relaxed);
        assert!(after >= before + 2, "{before} -> {after}");
        assert!(!fatal.token.is_cancelled());
        sup.stop_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_service_that_panics_raises_the_fatal_signal() {
        let status = StatusHub::default();
        let fatal = Fatal::default();
        let mut sup = Supervisor::new(
            factory(Arc::default(), 0, None),
            policy(),
            status.clone(),
            CancellationToken::new(),
            fatal.clone(),
        );
        let runs = Arc::new(Mutex::new(0));
        sup.start_service(
            "writer",
            OnFailure::Fatal,
            panicking_service(runs.clone(), 1),
        );
        let reason = fatal.raised().await;
        assert_eq!(
            reason,
            "task writer failed: the task panicked: injected panic 1"
        );
        assert_eq!(status.task("writer").unwrap().state, "failed");
        assert_eq!(*runs.lock().unwrap(), 1, "a fatal task is not restarted");
        sup.stop_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_returns_unasked_is_restarted() {
        let runs = Arc::new(Mutex::new(0u32));
        let r2 = runs.clone();
        let f: ServiceFactory = Arc::new(move |cancel: CancellationToken| {
            let r2 = r2.clone();
            Box::pin(async move {
                let n = {
                    let mut r = r2.lock().unwrap();
                    *r += 1;
                    *r
                };
                if n == 1 {
                    return Ok(()); // ended without being cancelled
                }
                cancel.cancelled().await;
                Ok(())
            })
        });
        let status = StatusHub::default();
        let mut sup = sup(factory(Arc::default(), 0, None), status.clone());
        sup.start_service("status_flusher", OnFailure::Restart, f);
        while *runs.lock().unwrap() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let row = status.task("status_flusher").unwrap();
        assert_eq!(row.restarts, 1);
        assert_eq!(row.last_error, "the task ended without being asked to");
        sup.stop_all().await;
    }
}
