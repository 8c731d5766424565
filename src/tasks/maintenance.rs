//! Maintenance: `OPTIMIZE` of the partitions that received late or replaced rows (tracked by
//! the writer, `store::partitions`), one partition at a time — the `optimize` command, and the
//! daemon's scheduled run (`app.maintenance`). Which rows make a partition dirty, and how that
//! is recorded, is not here.
//!
//! `OPTIMIZE … PARTITION ID '…' FINAL` (`--final`, and the scheduled run by default) rewrites
//! the partition into one part, removing every duplicate version, even when it already is one
//! part; ClickHouse refusing (busy merging it, out of disk) is an error with its reason. A
//! plain `OPTIMIZE … PARTITION ID '…'` merges the partition's parts (duplicates across them go)
//! and does nothing to a partition that is one part already. A partition is marked done when
//! its parts were merged into one; if late rows arrived while it ran, it stays dirty.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::MaintenanceConfig;
use crate::status::{task_state, StatusHub};
use crate::store::partitions::{check_partition_id, DirtyPartition, TrackedTable, TRACKED};
use crate::store::{Store, StoreError};
use crate::tasks::TaskError;
use qs_core::time::UnixMs;

/// A cron expression with seconds (`0 30 3 * * *`), evaluated in UTC — parsed as the gap-scan
/// scheduler (tokio-cron-scheduler) parses its schedules.
#[derive(Debug, Clone)]
pub struct Schedule(croner::Cron);

impl Schedule {
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr)
            .map(Schedule)
            .map_err(|e| format!("not a valid cron expression with seconds ({e})"))
    }

    /// The first run strictly after `t` (Unix ms), if any; runs are on whole seconds.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        // The cron's resolution is a second: from 12.5 s, the run after 12 s (not 12.5 s + n).
        let at = chrono::DateTime::from_timestamp(t.div_euclid(1000), 0)?;
        self.0
            .find_next_occurrence(&at, false)
            .ok()
            .map(|d| d.timestamp_millis())
    }
}

/// What one `optimize` pass does.
#[derive(Debug, Clone)]
pub struct Options {
    /// `OPTIMIZE … FINAL` rather than a plain `OPTIMIZE`.
    pub with_final: bool,
    /// Every partition with parts, tracked as dirty or not (marks lost in a crash, or written
    /// by other programs, are covered too).
    pub all: bool,
    /// Only this table (every tracked table when `None`).
    pub table: Option<&'static TrackedTable>,
    /// List what would be optimized; change nothing.
    pub dry_run: bool,
    /// How long one partition's `OPTIMIZE` may take.
    pub timeout: Duration,
}

/// A partition to optimize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub table: &'static TrackedTable,
    pub partition_id: String,
    /// When it was last marked dirty (server clock, Unix s); `None`: not tracked as dirty.
    pub dirty_at: Option<u32>,
}

/// What became of one partition.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Merged into one part and marked done.
    Done,
    /// Optimized, but it stays dirty (the reason says why); the next run takes it again.
    StillDirty(String),
    /// Nothing done (`--dry-run`).
    Planned,
    Failed(String),
}

/// One partition's line of progress.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionReport {
    pub table: &'static str,
    pub partition_id: String,
    pub with_final: bool,
    pub parts_before: usize,
    pub parts_after: usize,
    /// Rows in its active parts afterwards (before, for a dry run).
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub dirty_at: Option<u32>,
    pub outcome: Outcome,
}

impl std::fmt::Display for PartitionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.with_final { "FINAL" } else { "plain" };
        write!(f, "optimize {} {}: ", self.table, self.partition_id)?;
        if self.outcome == Outcome::Planned {
            write!(
                f,
                "would run {kind} OPTIMIZE: parts {}, rows {}, bytes {}",
                self.parts_before, self.rows, self.bytes
            )?;
            return match self.dirty_at {
                Some(t) => write!(f, ", dirty since {}", UnixMs(i64::from(t) * 1000)),
                None => write!(f, ", not tracked as dirty"),
            };
        }
        if let Outcome::Failed(why) = &self.outcome {
            return write!(
                f,
                "{kind}, parts {}, seconds={:.2}: FAILED: {why}",
                self.parts_before, self.seconds
            );
        }
        write!(
            f,
            "{kind}, parts {} -> {}, rows {}, seconds={:.2}: ",
            self.parts_before, self.parts_after, self.rows, self.seconds
        )?;
        match &self.outcome {
            Outcome::Done => write!(f, "done"),
            Outcome::StillDirty(why) => write!(f, "still dirty ({why})"),
            Outcome::Failed(_) | Outcome::Planned => Ok(()),
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub with_final: bool,
    pub dry_run: bool,
    pub reports: Vec<PartitionReport>,
    pub seconds: f64,
    /// Set when the pass stopped before its last partition (cancelled, or ClickHouse gone).
    pub stopped: Option<String>,
}

impl Summary {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.reports.iter().filter(|r| f(&r.outcome)).count()
    }

    pub fn failed(&self) -> Vec<&PartitionReport> {
        self.reports
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .collect()
    }

    /// `Ok` when every partition was optimized or planned (staying dirty for new late rows is
    /// not a failure); else the problems in one message.
    pub fn result(&self) -> Result<(), String> {
        let failed = self.failed();
        let mut problems: Vec<String> = failed
            .iter()
            .map(|r| match &r.outcome {
                Outcome::Failed(why) => format!("{} {}: {why}", r.table, r.partition_id),
                _ => String::new(),
            })
            .collect();
        if let Some(why) = &self.stopped {
            problems.push(format!("stopped early: {why}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} partitions failed; they stay dirty and are retried next time: {}",
                failed.len(),
                self.reports.len(),
                problems.join("; ")
            ))
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.with_final { "FINAL" } else { "plain" };
        if self.reports.is_empty() && self.stopped.is_none() {
            return write!(
                f,
                "optimize: nothing to do (no partition received late or replaced rows since its last optimize)"
            );
        }
        if self.dry_run {
            return write!(
                f,
                "optimize --dry-run: {} partitions would get a {kind} OPTIMIZE",
                self.reports.len()
            );
        }
        write!(
            f,
            "optimize: {} partitions, {kind}: {} done, {} still dirty, {} failed, seconds={:.2}",
            self.reports.len(),
            self.count(|o| *o == Outcome::Done),
            self.count(|o| matches!(o, Outcome::StillDirty(_))),
            self.count(|o| matches!(o, Outcome::Failed(_))),
            self.seconds
        )?;
        if let Some(why) = &self.stopped {
            write!(f, "; stopped early: {why}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("cannot list the partitions to optimize: {0}")]
    List(StoreError),
}

/// The partitions a pass takes: the dirty ones, or with `all` every partition with parts
/// (dirty or not), of the chosen tables, in order.
pub async fn targets(store: &Store, opts: &Options) -> Result<Vec<Target>, StoreError> {
    let dirty = store.dirty_partitions(opts.table).await?;
    let dirty_at = |t: &TrackedTable, id: &str| {
        dirty
            .iter()
            .find(|d| d.table == t && d.partition_id == id)
            .map(|d| d.dirty_at)
    };
    if !opts.all {
        return Ok(dirty.iter().map(target_of).collect());
    }
    let mut out = Vec::new();
    for t in TRACKED.iter().copied() {
        if opts.table.is_some_and(|want| want != t) {
            continue;
        }
        for id in store.active_partitions(t).await? {
            out.push(Target {
                table: t,
                dirty_at: dirty_at(t, &id),
                partition_id: id,
            });
        }
    }
    Ok(out)
}

fn target_of(d: &DirtyPartition) -> Target {
    Target {
        table: d.table,
        partition_id: d.partition_id.clone(),
        dirty_at: Some(d.dirty_at),
    }
}

/// One pass: the targets, one partition at a time, each reported to `progress` as it ends.
/// Stops early on cancellation and when ClickHouse cannot be reached at all; a partition that
/// fails otherwise is reported and the pass goes on.
pub async fn optimize(
    store: &Store,
    opts: &Options,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(&PartitionReport) + Send),
) -> Result<Summary, MaintenanceError> {
    let started = Instant::now();
    let targets = targets(store, opts).await.map_err(MaintenanceError::List)?;
    let (reports, stopped) =
        in_turn(targets, cancel, |t| optimize_one(store, opts, t), progress).await;
    Ok(Summary {
        with_final: opts.with_final,
        dry_run: opts.dry_run,
        reports,
        seconds: started.elapsed().as_secs_f64(),
        stopped,
    })
}

/// Whether the pass goes on after a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Stop the pass, for this reason.
    Stop(String),
}

/// Runs `each` on the targets one after the other — never two at once — reporting each
/// result, until done, cancelled (between partitions, or abandoning the one in flight) or told
/// to stop. Returns the reports and why it stopped early, if it did.
pub async fn in_turn<T, F, Fut>(
    targets: Vec<T>,
    cancel: &CancellationToken,
    mut each: F,
    progress: &mut (dyn FnMut(&PartitionReport) + Send),
) -> (Vec<PartitionReport>, Option<String>)
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = (PartitionReport, Next)>,
{
    let mut reports = Vec::new();
    for t in targets {
        let (report, next) = tokio::select! {
            biased;
            _ = cancel.cancelled() => return (reports, Some("cancelled".into())),
            r = each(t) => r,
        };
        progress(&report);
        reports.push(report);
        if let Next::Stop(why) = next {
            return (reports, Some(why));
        }
    }
    (reports, None)
}

/// One partition: parts before, `OPTIMIZE`, parts after, the mark closed if the parts were
/// merged into one, and whether late rows arrived meanwhile.
async fn optimize_one(store: &Store, opts: &Options, t: Target) -> (PartitionReport, Next) {
    let started = Instant::now();
    let mut report = PartitionReport {
        table: t.table.name,
        partition_id: t.partition_id.clone(),
        with_final: opts.with_final,
        parts_before: 0,
        parts_after: 0,
        rows: 0,
        bytes: 0,
        seconds: 0.0,
        dirty_at: t.dirty_at,
        outcome: Outcome::Planned,
    };
    let result = optimize_steps(store, opts, &t, &mut report).await;
    report.seconds = started.elapsed().as_secs_f64();
    let next = match result {
        Ok(outcome) => {
            report.outcome = outcome;
            Next::Continue
        }
        Err(e) => {
            let stop = matches!(e, StoreError::Unreachable { .. } | StoreError::Auth { .. });
            report.outcome = Outcome::Failed(e.to_string());
            if stop {
                Next::Stop(e.to_string())
            } else {
                Next::Continue
            }
        }
    };
    (report, next)
}

async fn optimize_steps(
    store: &Store,
    opts: &Options,
    t: &Target,
    report: &mut PartitionReport,
) -> Result<Outcome, StoreError> {
    // A mark someone else wrote may name anything; only a real partition ID reaches SQL.
    check_partition_id(&t.partition_id)?;
    let before = store.active_parts(t.table, &t.partition_id).await?;
    report.parts_before = before.len();
    report.rows = before.iter().map(|p| p.rows).sum();
    report.bytes = before.iter().map(|p| p.bytes).sum();
    if opts.dry_run {
        return Ok(Outcome::Planned);
    }
    let started_at = start_after_mark(store, t.dirty_at).await?;
    let clock = Instant::now();
    if !before.is_empty() {
        store
            .optimize_partition(t.table, &t.partition_id, opts.with_final, opts.timeout)
            .await?;
    }
    let took_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    let after = store.active_parts(t.table, &t.partition_id).await?;
    report.parts_after = after.len();
    report.rows = after.iter().map(|p| p.rows).sum();
    report.bytes = after.iter().map(|p| p.bytes).sum();
    // Parts that were there before and are still active were not merged (a plain OPTIMIZE
    // leaves a partition that is one part alone: nothing to merge).
    let unmerged = before
        .iter()
        .filter(|b| after.iter().any(|a| a.name == b.name))
        .count();
    let merged = unmerged == 0 || (!opts.with_final && before.len() == 1);
    if !merged {
        let why = format!(
            "{unmerged} of its {} parts were not merged (ClickHouse may be merging them already)",
            before.len()
        );
        return if opts.with_final {
            Err(StoreError::Invalid(why))
        } else {
            Ok(Outcome::StillDirty(why))
        };
    }
    store
        .record_optimized(
            t.table,
            &t.partition_id,
            started_at,
            opts.with_final,
            took_ms,
        )
        .await?;
    let again = store
        .dirty_partitions(Some(t.table))
        .await?
        .into_iter()
        .any(|d| d.partition_id == t.partition_id);
    Ok(if again {
        Outcome::StillDirty("late rows arrived while it ran".into())
    } else {
        Outcome::Done
    })
}

/// The server's clock (Unix s) once it has moved past `dirty_at`, the partition's last mark
/// when the pass listed it. Marks are compared with an optimize's start by the second, and a
/// mark in the start's own second counts as newer (it may be): waiting for the next second
/// (at most about one) keeps a mark made just before the start from leaving the partition
/// dirty after its optimize.
async fn start_after_mark(store: &Store, dirty_at: Option<u32>) -> Result<u32, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = store.server_now().await?;
        if dirty_at.is_none_or(|d| now > d) || Instant::now() >= deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The wall clock the schedule follows, in Unix ms (injected so tests can run it on tokio's
/// paused clock).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Waits until wall time `at` (ms), in steps of at most a minute so that a clock step (NTP,
/// a suspended machine) is followed.
async fn sleep_until_wall(clock: &Clock, at: i64) {
    loop {
        let left = at.saturating_sub(clock());
        if left <= 0 {
            return;
        }
        let step = Duration::from_millis(u64::try_from(left.min(60_000)).unwrap_or(60_000));
        tokio::time::sleep(step).await;
    }
}

/// Runs `pass` at each time of `cfg`'s `optimize` schedule until `cancel`, one pass at a time:
/// the next time is the first one after the previous pass ended (a long pass skips the times
/// it overran, it does not queue them). An edit of the schedule applies at once (a pass in
/// flight finishes); an empty schedule idles until one is set. `on_disabled` is told when
/// the schedule is (or becomes) empty.
pub async fn run_schedule<F, Fut>(
    mut cfg: watch::Receiver<MaintenanceConfig>,
    clock: Clock,
    cancel: CancellationToken,
    mut on_disabled: impl FnMut(),
    mut pass: F,
) where
    F: FnMut(MaintenanceConfig) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let current = cfg.borrow_and_update().clone();
        let schedule = if current.optimize.is_empty() {
            None
        } else {
            match Schedule::parse(&current.optimize) {
                Ok(s) => Some(s),
                Err(e) => {
                    // Validated with the config; only reachable if the two parsers disagree.
                    error!(schedule = %current.optimize, error = %e, "Bad maintenance schedule; no scheduled optimize.");
                    None
                }
            }
        };
        let next = schedule.and_then(|s| s.next_after(clock()));
        let Some(next) = next else {
            on_disabled();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                changed = cfg.changed() => {
                    if changed.is_err() {
                        cancel.cancelled().await;
                        return;
                    }
                    continue;
                }
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            changed = cfg.changed() => {
                if changed.is_err() {
                    cancel.cancelled().await;
                    return;
                }
                continue;
            }
            _ = sleep_until_wall(&clock, next) => {}
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = pass(current) => {}
        }
    }
}

/// The daemon's scheduled maintenance, a service of the generation: at each time of
/// `app.maintenance.optimize` it optimizes the dirty partitions (`OPTIMIZE … FINAL` unless
/// `final: false`), one at a time. A failed pass is logged and shown in `task_status`
/// (`maintenance`, `last_error`) and retried at the next time; it never stops the daemon.
#[derive(Clone)]
pub struct Maintenance {
    pub store: Store,
    pub cfg: watch::Receiver<MaintenanceConfig>,
    pub status: StatusHub,
    pub clock: Clock,
}

/// The service's name in logs and `task_status`.
pub const MAINTENANCE: &str = "maintenance";

impl Maintenance {
    pub async fn run(self, cancel: CancellationToken) -> Result<(), TaskError> {
        let (store, status) = (self.store.clone(), self.status.clone());
        let disabled = self.status.clone();
        run_schedule(
            self.cfg,
            self.clock,
            cancel.clone(),
            move || {
                disabled.update_task(MAINTENANCE, |r| r.state = task_state::DISABLED.into());
            },
            move |cfg| {
                let (store, status, cancel) = (store.clone(), status.clone(), cancel.clone());
                async move { scheduled_pass(&store, &status, &cfg, &cancel).await }
            },
        )
        .await;
        Ok(())
    }
}

async fn scheduled_pass(
    store: &Store,
    status: &StatusHub,
    cfg: &MaintenanceConfig,
    cancel: &CancellationToken,
) {
    status.update_task(MAINTENANCE, |r| r.state = task_state::RUNNING.into());
    let opts = Options {
        with_final: cfg.use_final,
        all: false,
        table: None,
        dry_run: false,
        timeout: cfg.timeout,
    };
    let mut log = |r: &PartitionReport| match &r.outcome {
        Outcome::Failed(e) => {
            warn!(table = r.table, partition = %r.partition_id, parts_before = r.parts_before,
                seconds = r.seconds, error = %e, "Partition OPTIMIZE failed; it stays dirty.")
        }
        Outcome::StillDirty(why) => {
            info!(table = r.table, partition = %r.partition_id, parts_before = r.parts_before,
                parts_after = r.parts_after, seconds = r.seconds, reason = %why,
                "Partition optimized; it stays dirty.")
        }
        _ => info!(table = r.table, partition = %r.partition_id, parts_before = r.parts_before,
            parts_after = r.parts_after, rows = r.rows, seconds = r.seconds, "Partition optimized."),
    };
    let outcome = optimize(store, &opts, cancel, &mut log).await;
    if cancel.is_cancelled() {
        return;
    }
    let result = match outcome {
        Ok(summary) => {
            if !summary.reports.is_empty() {
                info!(summary = %summary, "Scheduled optimize done.");
            }
            summary.result()
        }
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => status.update_task(MAINTENANCE, |r| r.last_error.clear()),
        Err(e) => {
            warn!(error = %e, "Scheduled optimize failed; retrying at the next scheduled time.");
            status.update_task(MAINTENANCE, |r| r.last_error = e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn ms(iso: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(iso)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn next_runs_follow_the_cron_in_utc() {
        struct Case {
            name: &'static str,
            expr: &'static str,
            after: &'static str,
            next: &'static str,
        }
        let cases = [
            Case {
                name: "the default: later the same day",
                expr: "0 30 3 * * *",
                after: "2026-12-02T03:07:12Z",
                next: "2026-12-02T03:30:00Z",
            },
            Case {
                name: "the default, exactly at its time: the next day",
                expr: "0 30 3 * * *",
                after: "2026-12-02T03:30:00Z",
                next: "2026-12-03T03:30:00Z",
            },
            Case {
                name: "the default across a year end",
                expr: "0 30 3 * * *",
                after: "2026-12-31T04:00:00Z",
                next: "2027-01-01T03:30:00Z",
            },
            Case {
                name: "every 10 seconds",
                expr: "*/10 * * * * *",
                after: "2026-12-02T03:07:12.500Z",
                next: "2026-12-02T03:07:20Z",
            },
            Case {
                name: "Sundays at 04:00 (day of week)",
                expr: "0 0 4 * * SUN",
                after: "2026-12-02T03:07:12Z",
                next: "2026-12-06T04:00:00Z",
            },
        ];
        for c in cases {
            let s = Schedule::parse(c.expr).unwrap();
            assert_eq!(s.next_after(ms(c.after)), Some(ms(c.next)), "{}", c.name);
        }
        assert!(
            Schedule::parse("30 3 * * *").is_err(),
            "seconds are required"
        );
        assert!(Schedule::parse("0 61 3 * * *").is_err());
    }

    /// A wall clock that starts at `start` and moves with tokio's (paused) clock.
    fn virtual_clock(start: i64) -> Clock {
        let base = Instant::now();
        Arc::new(move || start + i64::try_from(base.elapsed().as_millis()).unwrap_or(i64::MAX))
    }

    fn cfg(expr: &str) -> MaintenanceConfig {
        MaintenanceConfig {
            optimize: expr.to_string(),
            ..MaintenanceConfig::default()
        }
    }

    /// A running schedule under test: its config sender, the (start, end) wall times of its
    /// passes, how often it was told it is disabled, and how to stop it.
    struct Scheduled {
        tx: watch::Sender<MaintenanceConfig>,
        passes: Arc<Mutex<Vec<(i64, i64)>>>,
        disabled: Arc<Mutex<u32>>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Scheduled {
        async fn stop(self) {
            self.cancel.cancel();
            self.task.await.unwrap();
        }
    }

    /// Runs the schedule with a pass that records its start and end wall times and takes
    /// `pass_takes`.
    fn start_schedule(expr: &str, start: &str, pass_takes: Duration) -> Scheduled {
        let (tx, rx) = watch::channel(cfg(expr));
        let clock = virtual_clock(ms(start));
        let passes = Arc::new(Mutex::new(Vec::new()));
        let disabled = Arc::new(Mutex::new(0u32));
        let cancel = CancellationToken::new();
        let (p, d, c) = (passes.clone(), disabled.clone(), clock.clone());
        let task = tokio::spawn(run_schedule(
            rx,
            clock,
            cancel.clone(),
            move || *d.lock().unwrap() += 1,
            move |_| {
                let (p, c) = (p.clone(), c.clone());
                async move {
                    let begin = c();
                    tokio::time::sleep(pass_takes).await;
                    p.lock().unwrap().push((begin, c()));
                }
            },
        ));
        Scheduled {
            tx,
            passes,
            disabled,
            cancel,
            task,
        }
    }

    async fn wait_passes(passes: &Arc<Mutex<Vec<(i64, i64)>>>, n: usize) {
        while passes.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_daily_run_fires_at_its_time_and_again_a_day_later() {
        let s = start_schedule(
            "0 30 3 * * *",
            "2026-12-02T03:29:00Z",
            Duration::from_secs(120),
        );
        wait_passes(&s.passes, 2).await;
        let p = s.passes.lock().unwrap().clone();
        assert_eq!(p[0].0, ms("2026-12-02T03:30:00Z"));
        assert_eq!(p[0].1, ms("2026-12-02T03:32:00Z"));
        assert_eq!(p[1].0, ms("2026-12-03T03:30:00Z"));
        s.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn passes_never_overlap_and_overrun_times_are_skipped_not_queued() {
        // Every 10 s, but a pass takes 25 s: passes start at :10, then :40 (the first time
        // after :35), then 1:10, ... each after the previous one ended.
        let s = start_schedule(
            "*/10 * * * * *",
            "2026-12-02T03:00:00Z",
            Duration::from_secs(25),
        );
        wait_passes(&s.passes, 4).await;
        let p = s.passes.lock().unwrap().clone();
        let starts: Vec<i64> = p
            .iter()
            .map(|(b, _)| (b - ms("2026-12-02T03:00:00Z")) / 1000)
            .collect();
        assert_eq!(starts[..4], [10, 40, 70, 100], "{p:?}");
        for w in p.windows(2) {
            assert!(
                w[1].0 >= w[0].1,
                "a pass started before the previous one ended: {p:?}"
            );
        }
        s.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_edit_reschedules_and_an_empty_schedule_disables() {
        let s = start_schedule(
            "0 30 3 * * *",
            "2026-12-02T03:00:00Z",
            Duration::from_secs(1),
        );
        let (tx, passes, disabled) = (&s.tx, &s.passes, &s.disabled);
        // Before 03:30 the schedule is set to every 10 s: it applies at once.
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send_replace(cfg("*/10 * * * * *"));
        wait_passes(passes, 1).await;
        assert_eq!(
            passes.lock().unwrap()[0].0,
            ms("2026-12-02T03:00:10Z"),
            "the edited schedule applies without waiting for the old time"
        );
        // Disabled: no pass for a (virtual) day.
        tx.send_replace(cfg(""));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*disabled.lock().unwrap(), 1);
        let n = passes.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert_eq!(
            passes.lock().unwrap().len(),
            n,
            "a disabled schedule runs nothing"
        );
        // Enabled again.
        tx.send_replace(cfg("*/10 * * * * *"));
        wait_passes(passes, n + 1).await;
        s.stop().await;
    }

    fn report(id: &str, outcome: Outcome) -> PartitionReport {
        PartitionReport {
            table: "klines",
            partition_id: id.to_string(),
            with_final: true,
            parts_before: 2,
            parts_after: 1,
            rows: 10,
            bytes: 100,
            seconds: 1.0,
            dirty_at: Some(1),
            outcome,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_are_optimized_one_at_a_time_and_a_failure_does_not_stop_the_others() {
        let in_flight = Arc::new(Mutex::new((0u32, 0u32))); // (now, max)
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut seen = Vec::new();
        let (f, o) = (in_flight.clone(), order.clone());
        let (reports, stopped) = in_turn(
            vec!["2019", "2020", "2021", "2022"],
            &CancellationToken::new(),
            move |id: &str| {
                let (f, o) = (f.clone(), o.clone());
                async move {
                    {
                        let mut g = f.lock().unwrap();
                        g.0 += 1;
                        g.1 = g.1.max(g.0);
                    }
                    o.lock().unwrap().push((id.to_string(), Instant::now()));
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    f.lock().unwrap().0 -= 1;
                    let outcome = if id == "2020" {
                        Outcome::Failed("ClickHouse error 388: busy".into())
                    } else {
                        Outcome::Done
                    };
                    (report(id, outcome), Next::Continue)
                }
            },
            &mut |r| seen.push(r.partition_id.clone()),
        )
        .await;
        assert_eq!(in_flight.lock().unwrap().1, 1, "never two at once");
        let order = order.lock().unwrap().clone();
        let ids: Vec<&str> = order.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["2019", "2020", "2021", "2022"]);
        for w in order.windows(2) {
            assert_eq!(
                w[1].1 - w[0].1,
                Duration::from_secs(30),
                "each after the previous"
            );
        }
        assert_eq!(
            seen,
            ["2019", "2020", "2021", "2022"],
            "progress per partition"
        );
        assert_eq!(stopped, None);
        let summary = Summary {
            with_final: true,
            dry_run: false,
            reports,
            seconds: 120.0,
            stopped,
        };
        let err = summary.result().unwrap_err();
        assert!(
            err.contains("1 of 4 partitions failed")
                && err.contains("klines 2020: ClickHouse error 388"),
            "{err}"
        );
        assert_eq!(
            summary.to_string(),
            "optimize: 4 partitions, FINAL: 3 done, 0 still dirty, 1 failed, seconds=120.00"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_server_or_cancellation_stops_the_pass() {
        let (reports, stopped) = in_turn(
            vec!["2019", "2020", "2021"],
            &CancellationToken::new(),
            |id: &str| async move {
                let why = "ClickHouse at http://127.0.0.1:1 is unreachable".to_string();
                (report(id, Outcome::Failed(why.clone())), Next::Stop(why))
            },
            &mut |_| {},
        )
        .await;
        assert_eq!(reports.len(), 1, "no partition after the server is gone");
        assert!(stopped.unwrap().contains("unreachable"));

        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let (reports, stopped) = in_turn(
            vec!["2019", "2020", "2021"],
            &cancel,
            move |id: &str| {
                let c = c.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    if id == "2020" {
                        c.cancel();
                        std::future::pending::<()>().await;
                    }
                    (report(id, Outcome::Done), Next::Continue)
                }
            },
            &mut |_| {},
        )
        .await;
        assert_eq!(reports.len(), 1);
        assert_eq!(stopped.as_deref(), Some("cancelled"));
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            report("2024", Outcome::Done).to_string(),
            "optimize klines 2024: FINAL, parts 2 -> 1, rows 10, seconds=1.00: done"
        );
        assert_eq!(
            report("2026", Outcome::StillDirty("late rows arrived while it ran".into())).to_string(),
            "optimize klines 2026: FINAL, parts 2 -> 1, rows 10, seconds=1.00: still dirty (late rows arrived while it ran)"
        );
        assert_eq!(
            report("2020", Outcome::Failed("ClickHouse error 236: Cancelled merging parts".into())).to_string(),
            "optimize klines 2020: FINAL, parts 2, seconds=1.00: FAILED: ClickHouse error 236: Cancelled merging parts"
        );
        assert_eq!(
            report("2024", Outcome::Planned).to_string(),
            "optimize klines 2024: would run FINAL OPTIMIZE: parts 2, rows 10, bytes 100, dirty since 1970-01-01T00:00:01.000Z"
        );
    }
}
