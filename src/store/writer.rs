//! The one batched writer of klines and indicator values: a bounded channel of [`Row`]s in
//! (back-pressure, not unbounded memory), RowBinary inserts out (one per table), flushed by row
//! count or interval. A failed insert keeps its batch and is retried with jittered backoff, so
//! no row is ever dropped; shutdown flushes. Within a flush, klines are inserted before
//! indicator values. Creates the per-pair views (`klines_btcusdt_spot_1m`,
//! `indicators_btcusdt_spot_1m`) when a pair's first rows of that table are written.
//! It does not decide what to write (tasks do) and does not dedupe (ReplacingMergeTree does).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::indicators::CheckpointRow;
use super::partitions::{self, DirtyMarks, DirtyTracker};
use super::{native, KlineRow, Store, StoreError};
use crate::config::WriterConfig;
use crate::lock;
use crate::market::{Kline, PairKey};

/// One computed indicator output at one candle: a row of `indicators`.
#[derive(Debug, Clone, PartialEq)]
pub struct IndicatorValue {
    pub pair: PairKey,
    pub open_time: i64,
    /// The normalised spec (`macd(12,26,9)`), shared by every row of that indicator.
    pub indicator: Arc<str>,
    /// The output's name (`value` for single-output indicators).
    pub output: &'static str,
    pub value: f64,
}

/// A durable checkpoint of one indicator's state over a pair's series (a row of
/// `indicator_checkpoints`): the state after the candle at `open_time`, `bars` candles in.
/// It goes through the writer after the values it covers, so it is never committed before them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub pair: PairKey,
    pub indicator: Arc<str>,
    pub open_time: i64,
    pub bars: u64,
    pub state: String,
}

/// What goes through the writer's channel: a row of one of the tables it writes.
#[derive(Debug, Clone)]
pub enum Row {
    Kline(Kline),
    Indicator(IndicatorValue),
    Checkpoint(Checkpoint),
}

/// Who is told which closed candles the writer committed: per pair, every subscriber learns
/// the earliest `open_time` of the closed candles committed since it last looked (the
/// indicator tasks, to advance, or to recompute after a late candle). Cheap to clone.
#[derive(Clone, Default)]
pub struct CommitFeed {
    subs: Arc<Mutex<HashMap<PairKey, Vec<Weak<SubState>>>>>,
    /// Told of every commit (the client server's hub forgets the frames it kept for replays
    /// once their rows are stored).
    hook: Arc<Mutex<Option<CommitHook>>>,
}

impl std::fmt::Debug for CommitFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitFeed").finish_non_exhaustive()
    }
}

/// What a commit stored, for a [`CommitHook`]: kline rows (any pairs, closed and in
/// progress), or one indicator's values of a pair with `open_time` in `[earliest, latest]`.
#[derive(Debug, Clone, Copy)]
pub enum Committed<'a> {
    Klines(&'a [Kline]),
    Indicator {
        pair: &'a PairKey,
        indicator: &'a str,
        earliest: i64,
        latest: i64,
    },
}

/// Called by the writer after each commit, on the writer's task: keep it short.
pub type CommitHook = Arc<dyn Fn(Committed<'_>) + Send + Sync>;

#[derive(Debug, Default)]
struct SubState {
    earliest: Mutex<Option<i64>>,
    wake: Notify,
}

/// One subscriber's view of a pair's commits.
#[derive(Debug)]
pub struct CommitSubscription {
    state: Arc<SubState>,
}

impl CommitSubscription {
    /// Waits until closed candles of the pair were committed since the last `take` (returns at
    /// once if some already were).
    pub async fn changed(&self) {
        self.state.wake.notified().await;
    }

    /// The earliest `open_time` committed since the last call, if any.
    pub fn take(&self) -> Option<i64> {
        lock(&self.state.earliest).take()
    }
}

impl CommitFeed {
    pub fn subscribe(&self, pair: &PairKey) -> CommitSubscription {
        let state = Arc::new(SubState::default());
        lock(&self.subs)
            .entry(pair.clone())
            .or_default()
            .push(Arc::downgrade(&state));
        CommitSubscription { state }
    }

    /// Sets the hook told of every commit (replacing any earlier one).
    pub fn set_hook(&self, hook: CommitHook) {
        *lock(&self.hook) = Some(hook);
    }

    fn tell(&self, what: Committed<'_>) {
        let hook = lock(&self.hook).clone();
        if let Some(h) = hook {
            h(what);
        }
    }

    /// Records that closed candles of `pair` from `earliest` on were committed.
    pub fn committed(&self, pair: &PairKey, earliest: i64) {
        let mut subs = lock(&self.subs);
        let Some(list) = subs.get_mut(pair) else {
            return;
        };
        list.retain(|w| match w.upgrade() {
            Some(s) => {
                let mut e = lock(&s.earliest);
                *e = Some(e.map_or(earliest, |x| x.min(earliest)));
                drop(e);
                s.wake.notify_one();
                true
            }
            None => false,
        });
        if list.is_empty() {
            subs.remove(pair);
        }
    }
}

/// Counters shared between the writer and everyone holding a handle (for the metrics line).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Kline rows written.
    rows_written: AtomicU64,
    indicator_rows_written: AtomicU64,
    batches_written: AtomicU64,
    insert_failures: AtomicU64,
    /// Rows taken from the channel and not yet written (the batch being built or retried).
    buffered: AtomicU64,
    /// Rows of the indicator insert running beside the batch being built.
    in_flight: AtomicU64,
}

impl WriterStats {
    pub fn rows_written(&self) -> u64 {
        self.rows_written.load(Ordering::Relaxed)
    }
    pub fn indicator_rows_written(&self) -> u64 {
        self.indicator_rows_written.load(Ordering::Relaxed)
    }
    pub fn batches_written(&self) -> u64 {
        self.batches_written.load(Ordering::Relaxed)
    }
    pub fn insert_failures(&self) -> u64 {
        self.insert_failures.load(Ordering::Relaxed)
    }
    /// Rows taken from the channel and not yet written (including an insert in flight).
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed) + self.in_flight.load(Ordering::Relaxed)
    }
    fn set_buffered(&self, rows: usize) {
        self.buffered.store(rows as u64, Ordering::Relaxed);
    }
}

/// The writer has stopped; the row was not accepted (the caller still owns it).
#[derive(Debug, thiserror::Error)]
#[error("the kline writer has stopped")]
pub struct WriterClosed(pub Box<Kline>);

/// The writer has stopped; the indicator values were not all accepted.
#[derive(Debug, thiserror::Error)]
#[error("the writer has stopped; {unsent} indicator values were not accepted")]
pub struct IndicatorsNotAccepted {
    pub unsent: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("{rows} rows could not be written to ClickHouse before the shutdown deadline ({last_error})")]
    Unflushed { rows: usize, last_error: StoreError },
}

/// Cheap to clone; every producer holds one.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Row>,
    stats: Arc<WriterStats>,
    commits: CommitFeed,
}

impl WriterHandle {
    /// Queues one row, waiting while the channel is full (back-pressure).
    pub async fn send(&self, kline: Kline) -> Result<(), WriterClosed> {
        match self.tx.reserve().await {
            Ok(permit) => {
                permit.send(Row::Kline(kline));
                Ok(())
            }
            Err(_) => Err(WriterClosed(Box::new(kline))),
        }
    }

    /// Queues many rows with one wait per group instead of one per row (bulk producers).
    pub async fn send_many(&self, rows: Vec<Kline>) -> Result<(), WriterClosed> {
        let mut rows = rows.into_iter();
        match self.send_rows(&mut rows, Row::Kline).await {
            Ok(()) => Ok(()),
            Err(()) => rows
                .next()
                .map_or(Ok(()), |k| Err(WriterClosed(Box::new(k)))),
        }
    }

    /// Queues indicator values, with the same back-pressure as klines.
    pub async fn send_indicators(
        &self,
        values: Vec<IndicatorValue>,
    ) -> Result<(), IndicatorsNotAccepted> {
        let mut rows = values.into_iter();
        self.send_rows(&mut rows, Row::Indicator)
            .await
            .map_err(|()| IndicatorsNotAccepted { unsent: rows.len() })
    }

    /// Queues a durable checkpoint, committed after everything queued before it.
    pub async fn send_checkpoint(&self, cp: Checkpoint) -> Result<(), IndicatorsNotAccepted> {
        self.tx
            .send(Row::Checkpoint(cp))
            .await
            .map_err(|_| IndicatorsNotAccepted { unsent: 1 })
    }

    /// The feed of committed closed candles.
    pub fn commits(&self) -> &CommitFeed {
        &self.commits
    }

    /// Sends every item of `rows` with one wait per group; `Err` (with the unsent items left
    /// in `rows`) when the writer has stopped.
    async fn send_rows<T>(
        &self,
        rows: &mut std::vec::IntoIter<T>,
        wrap: fn(T) -> Row,
    ) -> Result<(), ()> {
        let group = (self.tx.max_capacity() / 4).max(1);
        loop {
            let n = rows.len().min(group);
            if n == 0 {
                return Ok(());
            }
            match self.tx.reserve_many(n).await {
                Ok(permits) => {
                    for (permit, k) in permits.zip(rows.by_ref()) {
                        permit.send(wrap(k));
                    }
                }
                Err(_) => return Err(()),
            }
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Free slots in the channel; 0 means producers are being held back.
    pub fn free_capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// A view of the queue that does not keep the writer's channel open (for metrics).
    pub fn gauge(&self) -> WriterGauge {
        WriterGauge {
            tx: self.tx.downgrade(),
            stats: self.stats.clone(),
            capacity: self.tx.max_capacity(),
        }
    }
}

/// How full the writer's queue is, without holding it open.
#[derive(Debug, Clone)]
pub struct WriterGauge {
    tx: mpsc::WeakSender<Row>,
    stats: Arc<WriterStats>,
    capacity: usize,
}

impl WriterGauge {
    /// Rows accepted and not yet written (queued in the channel plus the batch in hand), or
    /// `None` once the writer's channel is gone.
    pub fn queued(&self) -> Option<u64> {
        let tx = self.tx.upgrade()?;
        let in_channel = tx.max_capacity().saturating_sub(tx.capacity());
        Some(in_channel as u64 + self.stats.buffered())
    }

    /// Rows the channel holds before producers wait (`app.writer.channel_capacity`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What a finished writer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterSummary {
    /// Kline rows.
    pub rows_written: u64,
    pub indicator_rows_written: u64,
    pub batches_written: u64,
    pub insert_failures: u64,
}

pub struct Writer {
    store: Store,
    cfg: WriterConfig,
    rx: mpsc::Receiver<Row>,
    stats: Arc<WriterStats>,
    commits: CommitFeed,
    views: HashSet<(ViewKind, PairKey)>,
    /// Which `klines` partitions committed rows made dirty.
    dirty: DirtyTracker<PairKey>,
    /// Which `indicators` partitions committed rows made dirty (a series is one output of one
    /// indicator of one pair).
    dirty_indicators: DirtyTracker<IndicatorSeries>,
    marks: DirtyMarks,
}

/// One output of one indicator of one pair: a series of `indicators` rows.
type IndicatorSeries = (PairKey, Arc<str>, &'static str);

/// The rows taken from the channel and not yet written, per table.
#[derive(Debug, Default)]
struct Batch {
    klines: Vec<Kline>,
    indicators: Vec<IndicatorValue>,
    /// The version stamped on `indicators`, chosen at their first attempt and kept across
    /// retries: a batch retried after a later one committed must not win over it.
    indicator_version: Option<u64>,
    checkpoints: Vec<Checkpoint>,
}

/// An insert of indicator values running while the writer takes the next batch (offline runs
/// and catch-ups send millions of them: the server finishes one insert while the next is
/// encoded and sent). Only a batch of indicator values alone goes in flight; anything else
/// waits for it to land first, so klines still commit before the values computed from them and
/// checkpoints after the values they cover.
struct InFlight {
    done: std::pin::Pin<Box<dyn std::future::Future<Output = Landed> + Send>>,
}

/// What an in-flight insert gives back: its rows, their version and how it ended.
type Landed = (Vec<IndicatorValue>, u64, Result<(), StoreError>);

impl Batch {
    fn len(&self) -> usize {
        self.klines.len() + self.indicators.len() + self.checkpoints.len()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn push(&mut self, row: Row) {
        match row {
            Row::Kline(k) => self.klines.push(k),
            Row::Indicator(v) => self.indicators.push(v),
            Row::Checkpoint(c) => self.checkpoints.push(c),
        }
    }
}

/// Which table a per-pair view reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViewKind {
    Klines,
    Indicators,
}

impl Writer {
    pub fn new(store: Store, cfg: WriterConfig) -> (Writer, WriterHandle) {
        let (tx, rx) = mpsc::channel(cfg.channel_capacity.max(1));
        let stats = Arc::new(WriterStats::default());
        let commits = CommitFeed::default();
        let handle = WriterHandle {
            tx,
            stats: stats.clone(),
            commits: commits.clone(),
        };
        let writer = Writer {
            store,
            cfg,
            rx,
            stats,
            commits,
            views: HashSet::new(),
            dirty: DirtyTracker::new(&partitions::KLINES),
            dirty_indicators: DirtyTracker::new(&partitions::INDICATORS),
            marks: DirtyMarks::default(),
        };
        (writer, handle)
    }

    /// Runs until cancelled or until every handle is dropped, then flushes what it holds,
    /// retrying for up to `shutdown_timeout`. Beside it, the dirty partitions are recorded as
    /// they come, and once more after the last write.
    pub async fn run(self, cancel: CancellationToken) -> Result<WriterSummary, WriterError> {
        let done = CancellationToken::new();
        let recorder =
            partitions::record_marks(self.store.clone(), self.marks.clone(), done.clone());
        let writes = async {
            let result = self.write(cancel).await;
            done.cancel();
            result
        };
        let (result, ()) = tokio::join!(writes, recorder);
        result
    }

    async fn write(mut self, cancel: CancellationToken) -> Result<WriterSummary, WriterError> {
        let mut buf = Batch::default();
        let mut incoming: Vec<Row> = Vec::with_capacity(self.cfg.batch_rows.min(100_000));
        // When the oldest buffered row must be flushed at the latest.
        let mut flush_at: Option<Instant> = None;
        let mut deadline: Option<Instant> = None;
        let mut in_flight: Option<InFlight> = None;
        loop {
            let space = room(buf.len(), self.cfg.batch_rows);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                (rows, version, result) = async {
                    match in_flight.as_mut() {
                        Some(f) => f.done.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_some() => {
                    in_flight = None;
                    self.landed(rows, version, result, &cancel, &mut deadline).await?;
                    if deadline.is_some() { break; }
                }
                received = self.rx.recv_many(&mut incoming, space) => match received {
                    n if n > 0 => {
                        for row in incoming.drain(..) {
                            buf.push(row);
                        }
                        self.stats.set_buffered(buf.len());
                        crate::faults::hit("writer");
                        if buf.len() == n {
                            flush_at = Some(Instant::now() + self.cfg.flush_interval);
                        }
                        if buf.len() >= self.cfg.batch_rows {
                            self.dispatch(&mut buf, &mut in_flight, &cancel, &mut deadline).await?;
                            flush_at = None;
                            if deadline.is_some() { break; }
                        }
                    }
                    _ => break,
                },
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)),
                    if flush_at.is_some() =>
                {
                    self.dispatch(&mut buf, &mut in_flight, &cancel, &mut deadline).await?;
                    flush_at = None;
                    if deadline.is_some() { break; }
                }
            }
        }
        // Drain: no new rows are accepted; everything already queued is written.
        self.rx.close();
        let mut deadline =
            Some(deadline.unwrap_or_else(|| Instant::now() + self.cfg.shutdown_timeout));
        if let Some(f) = in_flight.take() {
            let (rows, version, result) = f.done.await;
            self.landed(rows, version, result, &cancel, &mut deadline)
                .await?;
        }
        while let Some(row) = self.rx.recv().await {
            buf.push(row);
            self.stats.set_buffered(buf.len());
            if buf.len() >= self.cfg.batch_rows {
                self.flush(&mut buf, &cancel, &mut deadline).await?;
            }
        }
        if !buf.is_empty() {
            self.flush(&mut buf, &cancel, &mut deadline).await?;
        }
        let summary = WriterSummary {
            rows_written: self.stats.rows_written(),
            indicator_rows_written: self.stats.indicator_rows_written(),
            batches_written: self.stats.batches_written(),
            insert_failures: self.stats.insert_failures(),
        };
        info!(
            rows = summary.rows_written,
            indicator_rows = summary.indicator_rows_written,
            batches = summary.batches_written,
            "Writer stopped; everything flushed."
        );
        Ok(summary)
    }

    /// Writes `buf`: a batch of indicator values alone goes in flight (after the one before it
    /// has landed) and the writer goes on taking rows; anything else is flushed here.
    async fn dispatch(
        &mut self,
        buf: &mut Batch,
        in_flight: &mut Option<InFlight>,
        cancel: &CancellationToken,
        deadline: &mut Option<Instant>,
    ) -> Result<(), WriterError> {
        if let Some(f) = in_flight.take() {
            let (rows, version, result) = f.done.await;
            self.landed(rows, version, result, cancel, deadline).await?;
        }
        let alone = buf.klines.is_empty() && buf.checkpoints.is_empty();
        if !alone || buf.indicators.is_empty() || deadline.is_some() {
            return self.flush(buf, cancel, deadline).await;
        }
        let rows = std::mem::take(&mut buf.indicators);
        let version = buf.indicator_version.take().unwrap_or_else(now_us);
        self.stats.set_buffered(0);
        self.stats
            .in_flight
            .store(rows.len() as u64, Ordering::Relaxed);
        let (store, limit) = (self.store.clone(), self.store.timeout());
        *in_flight = Some(InFlight {
            done: Box::pin(async move {
                let result = insert_native(
                    &store,
                    "indicators",
                    &rows,
                    limit,
                    &indicator_columns(version),
                )
                .await;
                (rows, version, result)
            }),
        });
        Ok(())
    }

    /// An in-flight insert has ended: its rows are committed, or they are retried here (with
    /// their version) until they are or the shutdown deadline passes.
    async fn landed(
        &mut self,
        rows: Vec<IndicatorValue>,
        version: u64,
        result: Result<(), StoreError>,
        cancel: &CancellationToken,
        deadline: &mut Option<Instant>,
    ) -> Result<(), WriterError> {
        self.stats.in_flight.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.stats.batches_written.fetch_add(1, Ordering::Relaxed);
                self.indicators_committed(&rows, *deadline).await;
                Ok(())
            }
            Err(e) => {
                self.stats.insert_failures.fetch_add(1, Ordering::Relaxed);
                crate::metrics::add(&crate::metrics::WRITER_INSERT_FAILURES, 1);
                warn!(rows = rows.len(), error = %e,
                    "ClickHouse insert failed; keeping the batch and retrying.");
                let mut batch = Batch {
                    indicators: rows,
                    indicator_version: Some(version),
                    ..Batch::default()
                };
                self.stats.set_buffered(batch.len());
                self.flush(&mut batch, cancel, deadline).await
            }
        }
    }

    /// Writes `buf` or keeps retrying. Without a deadline it retries forever (the channel
    /// fills and producers wait); cancellation sets the shutdown deadline, which also caps
    /// every attempt, after which the remaining rows are reported as an error rather than
    /// dropped silently.
    async fn flush(
        &mut self,
        buf: &mut Batch,
        cancel: &CancellationToken,
        deadline: &mut Option<Instant>,
    ) -> Result<(), WriterError> {
        let mut attempt: u32 = 0;
        // The batch is counted once, when its first table is committed.
        let mut counted = false;
        loop {
            let limit = attempt_limit(self.store.timeout(), *deadline);
            let result = match limit {
                Some(_) => self.insert_batch(buf, *deadline, &mut counted).await,
                None => Err(StoreError::Timeout {
                    url: self.store.url().to_string(),
                    timeout: Duration::ZERO,
                }),
            };
            match result {
                Ok(()) => {
                    self.stats.set_buffered(0);
                    if attempt > 0 {
                        info!(
                            attempts = attempt + 1,
                            "ClickHouse insert succeeded after retries."
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    self.stats.insert_failures.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::add(&crate::metrics::WRITER_INSERT_FAILURES, 1);
                    let delay = crate::backoff::delay(
                        attempt,
                        Duration::from_millis(100),
                        self.cfg.max_backoff,
                        &mut rand::rng(),
                    );
                    attempt = attempt.saturating_add(1);
                    if let Some(d) = *deadline {
                        if Instant::now() + delay > d {
                            self.rx.close();
                            let rows = buf.len() + self.rx.len();
                            error!(rows, error = %e,
                                "Shutdown deadline passed; rows NOT written to ClickHouse.");
                            return Err(WriterError::Unflushed {
                                rows,
                                last_error: e,
                            });
                        }
                    }
                    if !e.is_retryable() && attempt >= 5 {
                        error!(rows = buf.len(), attempt, retry_in = ?delay, error = %e,
                            "ClickHouse keeps refusing this batch; the rows are kept and retried, \
                             and producers wait until the cause is fixed.");
                    } else {
                        warn!(rows = buf.len(), attempt, retry_in = ?delay, error = %e,
                            "ClickHouse insert failed; keeping the batch and retrying.");
                    }
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled(), if deadline.is_none() => {
                            *deadline = Some(Instant::now() + self.cfg.shutdown_timeout);
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Inserts what `buf` holds, table by table (klines first); each table's rows leave `buf`
    /// once committed, so a retry sends only what is left.
    async fn insert_batch(
        &mut self,
        buf: &mut Batch,
        deadline: Option<Instant>,
        counted: &mut bool,
    ) -> Result<(), StoreError> {
        let timeout = self.store.timeout();
        let limit = || attempt_limit(timeout, deadline).unwrap_or(Duration::ZERO);
        if !buf.klines.is_empty() {
            self.insert_rows("klines", &buf.klines, limit(), KlineRow::new)
                .await?;
            count_batch(&self.stats, counted);
            // Written: no longer queued (whatever the views below take); counted before the
            // rows count, so no scrape sees a row both written and queued.
            self.stats
                .set_buffered(buf.indicators.len() + buf.checkpoints.len());
            self.commits.tell(Committed::Klines(&buf.klines));
            let mut earliest: HashMap<&PairKey, i64> = HashMap::new();
            for k in buf.klines.iter().filter(|k| k.is_final) {
                let e = earliest.entry(&k.pair).or_insert(k.open_time);
                *e = (*e).min(k.open_time);
            }
            for (pair, t) in earliest {
                self.commits.committed(pair, t);
            }
            let n = buf.klines.len() as u64;
            self.stats.rows_written.fetch_add(n, Ordering::Relaxed);
            crate::metrics::add(&crate::metrics::ROWS, n);
            let dirty = self.dirty.committed(
                buf.klines.iter().map(|k| (&k.pair, k.open_time)),
                crate::market::now_ms(),
            );
            self.marks.add(self.dirty.table().name, dirty);
            let pairs = new_pairs(
                &self.views,
                ViewKind::Klines,
                buf.klines.iter().map(|k| &k.pair),
            );
            self.ensure_views(ViewKind::Klines, pairs, deadline).await;
            buf.klines.clear();
        }
        if !buf.indicators.is_empty() {
            let version = *buf.indicator_version.get_or_insert_with(now_us);
            insert_native(
                &self.store,
                "indicators",
                &buf.indicators,
                limit(),
                &indicator_columns(version),
            )
            .await?;
            count_batch(&self.stats, counted);
            self.stats.set_buffered(buf.checkpoints.len());
            let rows = std::mem::take(&mut buf.indicators);
            buf.indicator_version = None;
            self.indicators_committed(&rows, deadline).await;
        }
        if !buf.checkpoints.is_empty() {
            self.insert_rows(
                "indicator_checkpoints",
                &buf.checkpoints,
                limit(),
                CheckpointRow::new,
            )
            .await?;
            count_batch(&self.stats, counted);
            self.stats.set_buffered(0);
            buf.checkpoints.clear();
        }
        Ok(())
    }

    /// One `INSERT` of `rows` into `table`, each row turned into its column-order struct by
    /// `row` (stamped with one ingest version per batch), within `limit`.
    async fn insert_rows<'r, S: Sync, T>(
        &self,
        table: &str,
        rows: &'r [S],
        limit: Duration,
        row: impl Fn(&'r S, u64) -> T + Send + Sync,
    ) -> Result<(), StoreError>
    where
        T: clickhouse::RowWrite + for<'a> clickhouse::Row<Value<'a> = T> + Send + Sync,
    {
        let version = now_us();
        let client = self.store.client();
        self.store
            .call_with_timeout(limit, async {
                let mut insert = client.insert::<T>(table).await?;
                for r in rows {
                    insert.write(&row(r, version)).await?;
                }
                insert.end().await
            })
            .await
    }

    /// After indicator values are committed: counts them, marks the partitions they make
    /// dirty and creates the per-pair views they need.
    async fn indicators_committed(&mut self, rows: &[IndicatorValue], deadline: Option<Instant>) {
        self.stats
            .indicator_rows_written
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        // One key per run of rows of the same series (offline runs send long runs).
        let runs = series_runs(rows);
        for ((pair, indicator, _), range) in &runs {
            let times = rows[range.clone()].iter().map(|v| v.open_time);
            let (earliest, latest) =
                times.fold((i64::MAX, i64::MIN), |(a, b), t| (a.min(t), b.max(t)));
            self.commits.tell(Committed::Indicator {
                pair,
                indicator,
                earliest,
                latest,
            });
        }
        let dirty = self.dirty_indicators.committed(
            runs.iter().flat_map(|(series, range)| {
                rows[range.clone()]
                    .iter()
                    .map(move |v| (series, v.open_time))
            }),
            crate::market::now_ms(),
        );
        self.marks.add(self.dirty_indicators.table().name, dirty);
        let pairs = new_pairs(
            &self.views,
            ViewKind::Indicators,
            runs.iter().map(|((pair, _, _), _)| pair),
        );
        self.ensure_views(ViewKind::Indicators, pairs, deadline)
            .await;
    }

    /// Creates the per-pair views of `kind` for pairs written for the first time.
    /// A failure is logged and retried with the next batch of that pair. An existing object
    /// of that name that is not a view (a table from an older deployment) is left alone,
    /// loudly.
    async fn ensure_views(
        &mut self,
        kind: ViewKind,
        pairs: Vec<PairKey>,
        deadline: Option<Instant>,
    ) {
        for pair in pairs {
            let Some(limit) = attempt_limit(self.store.timeout(), deadline) else {
                return;
            };
            let view = view_name(kind, &pair);
            let created =
                match tokio::time::timeout(limit, create_view_of(&self.store, kind, &pair)).await {
                    Ok(Ok(())) => self.store.table_engine(&view).await,
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StoreError::Timeout {
                        url: self.store.url().to_string(),
                        timeout: limit,
                    }),
                };
            match created {
                Ok(Some(engine)) if engine == "View" => {
                    debug!(%pair, view, "Per-pair view ready.");
                    self.views.insert((kind, pair));
                }
                Ok(engine) => {
                    error!(%pair, view, engine = ?engine,
                        "An object with the per-pair view's name exists and is not a view (an \
                         older deployment's table?); it is left alone and NOT updated. Rename it \
                         to get the per-pair view.");
                    self.views.insert((kind, pair));
                }
                Err(e) => warn!(%pair, error = %e, "Cannot create per-pair view; will retry."),
            }
        }
    }
}

/// One `INSERT … FORMAT Native` of `rows` into `table`, in blocks of up to
/// [`NATIVE_BLOCK_ROWS`] (encoded while earlier ones are on the wire), within `limit`.
async fn insert_native<R: Sync>(
    store: &Store,
    table: &str,
    rows: &[R],
    limit: Duration,
    columns: &[native::Column<'_, R>],
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO {table} {} FORMAT Native",
        native::column_list(columns)
    );
    let client = store.client();
    store
        .call_with_timeout(limit, async {
            let mut insert = client.insert_formatted_with(sql);
            for block in rows.chunks(NATIVE_BLOCK_ROWS) {
                let mut bytes = Vec::with_capacity(block.len() * 64);
                native::encode_block(block, columns, &mut bytes);
                insert.send(bytes::Bytes::from(bytes)).await?;
            }
            insert.end().await
        })
        .await
}

/// Rows per block of a Native insert: big enough that the per-block cost vanishes, small
/// enough that the server parses one while the next is encoded.
const NATIVE_BLOCK_ROWS: usize = 16_384;

/// The columns of an `indicators` insert, every row stamped with `version`.
fn indicator_columns(version: u64) -> [native::Column<'static, IndicatorValue>; 8] {
    use native::Column::{ConstU64, Str, F64, I64};
    [
        Str("market", |v| v.pair.market.as_str()),
        Str("symbol", |v| v.pair.symbol.as_str()),
        Str("period", |v| v.pair.period.as_str()),
        I64("open_time", |v| v.open_time),
        Str("indicator", |v| &v.indicator),
        Str("output", |v| v.output),
        F64("value", |v| v.value),
        ConstU64("version", version),
    ]
}

/// Counts a flush's batch once (before its rows count, as a scrape may look in between).
fn count_batch(stats: &WriterStats, counted: &mut bool) {
    if !std::mem::replace(counted, true) {
        stats.batches_written.fetch_add(1, Ordering::Relaxed);
    }
}

/// The runs of consecutive values of the same series, with their index ranges.
fn series_runs(values: &[IndicatorValue]) -> Vec<(IndicatorSeries, std::ops::Range<usize>)> {
    let same = |a: &IndicatorValue, b: &IndicatorValue| {
        a.output == b.output && a.indicator == b.indicator && a.pair == b.pair
    };
    let mut runs: Vec<(IndicatorSeries, std::ops::Range<usize>)> = Vec::new();
    let mut start = 0;
    for i in 1..=values.len() {
        if i == values.len() || !same(&values[i], &values[start]) {
            let v = &values[start];
            runs.push(((v.pair.clone(), v.indicator.clone(), v.output), start..i));
            start = i;
        }
    }
    runs
}

/// The distinct pairs of `pairs` that have no view of `kind` yet.
fn new_pairs<'a>(
    views: &HashSet<(ViewKind, PairKey)>,
    kind: ViewKind,
    pairs: impl Iterator<Item = &'a PairKey>,
) -> Vec<PairKey> {
    let mut new: Vec<PairKey> = Vec::new();
    let mut last: Option<&PairKey> = None;
    for p in pairs {
        // Rows come in runs of one pair: check each run once.
        if last == Some(p) {
            continue;
        }
        last = Some(p);
        if !new.contains(p) && !views.contains(&(kind, p.clone())) {
            new.push(p.clone());
        }
    }
    new
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// How many more rows fit in the batch (at least 1, as `recv_many` requires).
fn room(buffered: usize, batch_rows: usize) -> usize {
    batch_rows.saturating_sub(buffered).max(1)
}

/// How long the next ClickHouse call may take: the request timeout, capped by the shutdown
/// deadline; `None` when the deadline has passed.
fn attempt_limit(timeout: Duration, deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(timeout),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(timeout))
        }
    }
}

/// The per-pair view of `kind`: `klines_btcusdt_spot_1m` or `indicators_btcusdt_spot_1m`.
/// Built only from validated parts, so it is a safe identifier.
pub fn view_name(kind: ViewKind, pair: &PairKey) -> String {
    match kind {
        ViewKind::Klines => pair.view_name(),
        ViewKind::Indicators => format!(
            "indicators_{}_{}_{}",
            pair.symbol.as_str().to_ascii_lowercase(),
            pair.market,
            pair.period
        ),
    }
}

/// `CREATE VIEW IF NOT EXISTS klines_{symbol}_{market}_{period}` over `klines FINAL`.
pub async fn create_view(store: &Store, pair: &PairKey) -> Result<(), StoreError> {
    create_view_of(store, ViewKind::Klines, pair).await
}

/// `CREATE VIEW IF NOT EXISTS` the per-pair view of `kind` over its table `FINAL`.
/// The name is built from validated parts only; the filter values are bound.
pub async fn create_view_of(
    store: &Store,
    kind: ViewKind,
    pair: &PairKey,
) -> Result<(), StoreError> {
    let db = store.database();
    let view = view_name(kind, pair);
    let sql = match kind {
        ViewKind::Klines => format!(
            "CREATE VIEW IF NOT EXISTS `{db}`.`{view}` AS SELECT market, symbol, period, \
             open_time, close_time, open, high, low, close, volume, quote_volume, trades, \
             taker_buy_volume, taker_buy_quote_volume, is_final, source, ingested_at \
             FROM `{db}`.klines FINAL WHERE market = ? AND symbol = ? AND period = ?"
        ),
        ViewKind::Indicators => format!(
            "CREATE VIEW IF NOT EXISTS `{db}`.`{view}` AS SELECT market, symbol, period, \
             open_time, indicator, output, value \
             FROM `{db}`.indicators FINAL WHERE market = ? AND symbol = ? AND period = ?"
        ),
    };
    store
        .call(
            store
                .client()
                .query(&sql)
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .execute(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use crate::store::row_version;

    #[test]
    fn version_prefers_final_then_newest() {
        let old_final = row_version(true, 1_000);
        let new_open = row_version(false, 2_000_000_000_000_000);
        let new_final = row_version(true, 2_000);
        assert!(old_final > new_open);
        assert!(new_final > old_final);
        assert!(row_version(false, 2) > row_version(false, 1));
    }
}
