//! Which partitions need maintenance: the tables whose partitions are tracked and how each is
//! partitioned (the partition ID ClickHouse gives a row, computed here the way it does); the
//! rule that marks a partition *dirty* — it received late or replaced rows — applied by the
//! writer to every committed batch ([`DirtyTracker`]); the way those marks reach
//! `partition_maintenance` without ever holding up a kline write ([`DirtyMarks`], recorded
//! beside the writer by [`record_marks`]); and reading and closing the marks for `optimize`.
//! Running `OPTIMIZE` and scheduling it is `tasks::maintenance`'s.
//!
//! The rule. A committed row is a *plain append*, and marks nothing, when it lands in its
//! table's current partition (the partition of now) and its key is later than every row of its
//! series (a pair, for `klines`) this writer has committed before. Every other committed row
//! marks its partition: rows into a past partition (backfills, heals of old holes), and in the
//! current one rows at or before their series' newest (a catch-up or heal behind the live
//! edge, the same candle written twice, a closed candle replacing an in-progress one). Those
//! are the rows that leave duplicate versions, or parts that settle late, for `FINAL` to merge.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{Store, StoreError};

/// How a tracked table is partitioned; mirrors its `PARTITION BY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionScheme {
    /// `toYear(toDateTime(intDiv(t, 1000), 'UTC'))` over an Int64 of Unix milliseconds: one
    /// partition per UTC year, whose ID is the year (`2024`) as ClickHouse writes a single
    /// integer partition value. Exact for 1970-01-01 .. 2106-02-07, the range of `DateTime`.
    YearOfUnixMs,
}

impl PartitionScheme {
    /// The partition holding key `t`, as an ordinal (ordered like the partitions).
    pub fn ordinal(self, t: i64) -> i64 {
        match self {
            PartitionScheme::YearOfUnixMs => year_of_day(t.div_euclid(1000).div_euclid(86_400)),
        }
    }

    /// The ID ClickHouse gives the partition with this ordinal (`system.parts.partition_id`,
    /// `OPTIMIZE … PARTITION ID '…'`).
    pub fn id_of_ordinal(self, ordinal: i64) -> String {
        match self {
            PartitionScheme::YearOfUnixMs => ordinal.to_string(),
        }
    }

    /// The ID of the partition holding key `t`.
    pub fn partition_id(self, t: i64) -> String {
        self.id_of_ordinal(self.ordinal(t))
    }
}

/// The proleptic Gregorian year of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn year_of_day(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400;
    if mp >= 10 {
        year + 1
    } else {
        year
    }
}

/// A table whose dirty partitions are tracked and optimized.
#[derive(Debug, PartialEq, Eq)]
pub struct TrackedTable {
    pub name: &'static str,
    pub scheme: PartitionScheme,
}

/// `klines` (sql/0001): yearly partitions of `open_time`.
pub static KLINES: TrackedTable = TrackedTable {
    name: "klines",
    scheme: PartitionScheme::YearOfUnixMs,
};

/// `indicators` (sql/0007): yearly partitions of `open_time`, like `klines`.
pub static INDICATORS: TrackedTable = TrackedTable {
    name: "indicators",
    scheme: PartitionScheme::YearOfUnixMs,
};

/// Every tracked table (a table written through the writer joins here with its scheme, and
/// feeds its rows to a [`DirtyTracker`] of its own).
pub static TRACKED: &[&TrackedTable] = &[&KLINES, &INDICATORS];

/// The tracked table called `name`.
pub fn tracked(name: &str) -> Option<&'static TrackedTable> {
    TRACKED.iter().copied().find(|t| t.name == name)
}

/// Applies the rule (module docs) to one tracked table's committed rows. It remembers, per
/// series `S`, the newest key committed by this writer: one entry per series, nothing per row.
#[derive(Debug)]
pub struct DirtyTracker<S> {
    table: &'static TrackedTable,
    newest: HashMap<S, i64>,
}

impl<S: Eq + Hash + Clone> DirtyTracker<S> {
    pub fn new(table: &'static TrackedTable) -> Self {
        DirtyTracker {
            table,
            newest: HashMap::new(),
        }
    }

    pub fn table(&self) -> &'static TrackedTable {
        self.table
    }

    /// Takes note of rows `(series, key)` just committed, in commit order, at wall time
    /// `now_ms`; returns the IDs of the partitions they make dirty. Consecutive rows of the same
    /// series value (the same reference) are looked up once: a batch of a few long series costs
    /// a hash lookup per series, not per row.
    pub fn committed<'a>(
        &mut self,
        rows: impl IntoIterator<Item = (&'a S, i64)>,
        now_ms: i64,
    ) -> BTreeSet<String>
    where
        S: 'a,
    {
        let scheme = self.table.scheme;
        let current = scheme.ordinal(now_ms);
        let mut dirty = BTreeSet::new();
        // The series of the current run and its newest key so far (written back on change).
        let mut run: Option<(&'a S, Option<i64>)> = None;
        for (series, key) in rows {
            let newest = match &mut run {
                Some((s, newest)) if std::ptr::eq(*s, series) => newest,
                _ => {
                    if let Some((s, Some(n))) = run.take() {
                        self.remember(s, n);
                    }
                    let (_, newest) = run.insert((series, self.newest.get(series).copied()));
                    newest
                }
            };
            let behind = match newest {
                Some(n) => {
                    let behind = key <= *n;
                    *n = (*n).max(key);
                    behind
                }
                None => {
                    *newest = Some(key);
                    false
                }
            };
            let ordinal = scheme.ordinal(key);
            if behind || ordinal < current {
                dirty.insert(ordinal);
            }
        }
        if let Some((s, Some(n))) = run {
            self.remember(s, n);
        }
        dirty.into_iter().map(|o| scheme.id_of_ordinal(o)).collect()
    }

    fn remember(&mut self, series: &S, newest: i64) {
        match self.newest.get_mut(series) {
            Some(n) => *n = newest,
            None => {
                self.newest.insert(series.clone(), newest);
            }
        }
    }
}

/// A partition of a tracked table.
pub type PartitionRef = (&'static str, String);

/// Marks waiting to be recorded in `partition_maintenance`: a set (a partition marked a
/// thousand times before the next write is one row), filled by the writer without waiting
/// and emptied by [`record_marks`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DirtyMarks {
    pending: Arc<Mutex<BTreeSet<PartitionRef>>>,
    wake: Arc<Notify>,
}

impl DirtyMarks {
    /// Queues marks; never waits.
    pub fn add(&self, table: &'static str, ids: BTreeSet<String>) {
        if ids.is_empty() {
            return;
        }
        self.lock().extend(ids.into_iter().map(|id| (table, id)));
        self.wake.notify_one();
    }

    /// How many marks wait to be recorded.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<PartitionRef>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> BTreeSet<PartitionRef> {
        std::mem::take(&mut *self.lock())
    }

    fn put_back(&self, marks: BTreeSet<PartitionRef>) {
        self.lock().extend(marks);
    }
}

/// Marks are written at most this often (a partition marked by every batch of a backfill is
/// one small insert per interval, not one per batch).
const MARK_INTERVAL: Duration = Duration::from_secs(1);
/// Cap of the retry delay while ClickHouse refuses the marks.
const MARK_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the last write of the marks may take once the writer has stopped.
const FINAL_MARKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Records `marks` in `partition_maintenance` as they come (at most once per second) until
/// `done`, then writes what is left once. A failed write keeps its marks and is retried with
/// backoff; the kline writer never waits for any of it. Marks still unwritten at the end are
/// reported loudly (`optimize --all` covers them).
pub async fn record_marks(store: Store, marks: DirtyMarks, done: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            biased;
            _ = done.cancelled() => break,
            _ = marks.wake.notified() => {}
        }
        let batch = marks.take();
        if batch.is_empty() {
            continue;
        }
        let delay = match store.record_dirty(&batch).await {
            Ok(()) => {
                debug!(partitions = batch.len(), "Dirty partitions recorded.");
                failures = 0;
                MARK_INTERVAL
            }
            Err(e) => {
                let delay = crate::backoff::delay(
                    failures,
                    MARK_INTERVAL,
                    MARK_MAX_BACKOFF,
                    &mut rand::rng(),
                );
                failures = failures.saturating_add(1);
                warn!(partitions = batch.len(), retry_in = ?delay, error = %e,
                    "Cannot record dirty partitions; keeping them and retrying.");
                marks.put_back(batch);
                marks.wake.notify_one();
                delay
            }
        };
        tokio::select! {
            biased;
            _ = done.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    let batch = marks.take();
    if batch.is_empty() {
        return;
    }
    let limit = store.timeout().min(FINAL_MARKS_TIMEOUT);
    match tokio::time::timeout(limit, store.record_dirty(&batch)).await {
        Ok(Ok(())) => debug!(partitions = batch.len(), "Dirty partitions recorded."),
        Ok(Err(e)) => lost_marks(&batch, &e.to_string()),
        Err(_) => lost_marks(&batch, &format!("no answer within {limit:?}")),
    }
}

fn lost_marks(batch: &BTreeSet<PartitionRef>, why: &str) {
    let partitions: Vec<String> = batch.iter().map(|(t, p)| format!("{t} {p}")).collect();
    error!(partitions = %partitions.join(", "), error = %why,
        "Dirty partitions NOT recorded; their duplicates stay until `quantservice optimize --all` or a merge.");
}

/// A tracked partition whose last mark is not older than its last `OPTIMIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPartition {
    pub table: &'static TrackedTable,
    pub partition_id: String,
    /// When it was last marked (server clock, Unix seconds).
    pub dirty_at: u32,
    /// When its last successful `OPTIMIZE` started (0: never).
    pub optimized_at: u32,
}

/// One active part of a partition (`system.parts`).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct PartInfo {
    pub name: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct MarkState {
    table_name: String,
    partition_id: String,
    dirty_at: u32,
    optimized_at: u32,
}

#[derive(clickhouse::Row, Serialize)]
struct DirtyRow<'a> {
    table_name: &'a str,
    partition_id: &'a str,
    event: &'a str,
}

/// Partition IDs are letters, digits, `_` and `-` (ClickHouse writes integers, dates and hex
/// hashes); anything else is refused before it reaches SQL.
pub fn check_partition_id(id: &str) -> Result<(), StoreError> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("bad partition ID {id:?}")))
    }
}

impl Store {
    /// Records marks (`event = 'dirty'`, stamped by the server's clock).
    pub async fn record_dirty(&self, marks: &BTreeSet<PartitionRef>) -> Result<(), StoreError> {
        let client = self.client();
        self.call(async {
            let mut insert = client
                .insert::<DirtyRow<'_>>("partition_maintenance")
                .await?;
            for (table, id) in marks {
                insert
                    .write(&DirtyRow {
                        table_name: table,
                        partition_id: id,
                        event: "dirty",
                    })
                    .await?;
            }
            insert.end().await
        })
        .await
    }

    /// The dirty partitions of `table` (every tracked table when `None`), by table and ID.
    /// Marks of tables this build does not track are ignored.
    pub async fn dirty_partitions(
        &self,
        table: Option<&'static TrackedTable>,
    ) -> Result<Vec<DirtyPartition>, StoreError> {
        let rows: Vec<MarkState> = self
            .call(
                self.client()
                    .query(
                        "SELECT table_name, partition_id, \
                         toUInt32(maxIf(event_time, event = 'dirty')) AS dirty_at, \
                         toUInt32(maxIf(event_time, event = 'optimized')) AS optimized_at \
                         FROM partition_maintenance FINAL \
                         GROUP BY table_name, partition_id \
                         HAVING dirty_at > 0 AND dirty_at >= optimized_at \
                         ORDER BY table_name, partition_id",
                    )
                    .fetch_all::<MarkState>(),
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let t = tracked(&r.table_name)?;
                (table.is_none_or(|want| want == t)).then_some(DirtyPartition {
                    table: t,
                    partition_id: r.partition_id,
                    dirty_at: r.dirty_at,
                    optimized_at: r.optimized_at,
                })
            })
            .collect())
    }

    /// The IDs of the partitions of `table` that have active parts, in order.
    pub async fn active_partitions(
        &self,
        table: &'static TrackedTable,
    ) -> Result<Vec<String>, StoreError> {
        self.call(
            self.client()
                .query(
                    "SELECT DISTINCT partition_id FROM system.parts \
                     WHERE database = ? AND table = ? AND active ORDER BY partition_id",
                )
                .bind(self.database())
                .bind(table.name)
                .fetch_all::<String>(),
        )
        .await
    }

    /// The active parts of one partition, by name.
    pub async fn active_parts(
        &self,
        table: &'static TrackedTable,
        partition_id: &str,
    ) -> Result<Vec<PartInfo>, StoreError> {
        self.call(
            self.client()
                .query(
                    "SELECT name, rows, bytes_on_disk AS bytes FROM system.parts \
                     WHERE database = ? AND table = ? AND partition_id = ? AND active \
                     ORDER BY name",
                )
                .bind(self.database())
                .bind(table.name)
                .bind(partition_id)
                .fetch_all::<PartInfo>(),
        )
        .await
    }

    /// The server's clock, Unix seconds (what `partition_maintenance` is stamped with).
    pub async fn server_now(&self) -> Result<u32, StoreError> {
        self.call(
            self.client()
                .query("SELECT toUInt32(now())")
                .fetch_one::<u32>(),
        )
        .await
    }

    /// `OPTIMIZE TABLE db.table PARTITION ID 'id' [FINAL]`, waiting up to `timeout`. With
    /// `FINAL`, a merge ClickHouse cannot do (busy, out of space) is an error with its reason.
    pub async fn optimize_partition(
        &self,
        table: &'static TrackedTable,
        partition_id: &str,
        with_final: bool,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        check_partition_id(partition_id)?;
        let sql = format!(
            "OPTIMIZE TABLE `{db}`.`{table}` PARTITION ID '{partition_id}'{fin}",
            db = self.database(),
            table = table.name,
            fin = if with_final { " FINAL" } else { "" },
        );
        let mut query = self.client().query(&sql);
        if with_final {
            query = query.with_setting("optimize_throw_if_noop", "1");
        }
        self.call_with_timeout(timeout, query.execute()).await
    }

    /// Records a successful `OPTIMIZE` of a partition that started at `started_at` (server
    /// clock): marks older than that are done.
    pub async fn record_optimized(
        &self,
        table: &'static TrackedTable,
        partition_id: &str,
        started_at: u32,
        with_final: bool,
        duration_ms: u64,
    ) -> Result<(), StoreError> {
        self.call(
            self.client()
                .query(
                    "INSERT INTO partition_maintenance \
                     (table_name, partition_id, event, event_time, with_final, duration_ms) \
                     VALUES (?, ?, 'optimized', ?, ?, ?)",
                )
                .bind(table.name)
                .bind(partition_id)
                .bind(started_at)
                .bind(u8::from(with_final))
                .bind(duration_ms)
                .execute(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-01T00:00:00Z and friends, in ms.
    const Y2024: i64 = 1_704_067_200_000;
    const Y2025: i64 = 1_735_689_600_000;
    const Y2026: i64 = 1_767_225_600_000;

    #[test]
    fn partition_ids_are_utc_years() {
        struct Case {
            name: &'static str,
            t: i64,
            id: &'static str,
        }
        let cases = [
            Case {
                name: "the epoch",
                t: 0,
                id: "1970",
            },
            Case {
                name: "first millisecond of 2024",
                t: Y2024,
                id: "2024",
            },
            Case {
                name: "last millisecond of 2024 (a leap year)",
                t: Y2025 - 1,
                id: "2024",
            },
            Case {
                name: "29 February 2024",
                t: Y2024 + 59 * 86_400_000,
                id: "2024",
            },
            Case {
                name: "first millisecond of 2025",
                t: Y2025,
                id: "2025",
            },
            Case {
                name: "2100 is not a leap year: 31 December 2100 23:59:59.999",
                t: 4_133_980_799_999,
                id: "2100",
            },
        ];
        for c in cases {
            assert_eq!(
                PartitionScheme::YearOfUnixMs.partition_id(c.t),
                c.id,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn the_rule_marks_late_and_replaced_rows_only() {
        struct Case {
            name: &'static str,
            /// Batches of (series, open time), committed in this order.
            batches: Vec<Vec<(&'static str, i64)>>,
            /// Partitions each batch marks.
            marked: Vec<Vec<&'static str>>,
        }
        let now = Y2026 + 300 * 86_400_000;
        let m = 60_000;
        let live = Y2026 + 299 * 86_400_000;
        let cases = [
            Case {
                name: "in-order appends to the current partition mark nothing",
                batches: vec![
                    vec![("a", live), ("a", live + m)],
                    vec![("a", live + 2 * m)],
                ],
                marked: vec![vec![], vec![]],
            },
            Case {
                name: "the same candle twice (a catch-up and the stream) marks its partition",
                batches: vec![vec![("a", live), ("a", live + m)], vec![("a", live + m)]],
                marked: vec![vec![], vec!["2026"]],
            },
            Case {
                name: "a heal behind the live edge marks the current partition",
                batches: vec![vec![("a", live + 5 * m)], vec![("a", live + 2 * m)]],
                marked: vec![vec![], vec!["2026"]],
            },
            Case {
                name: "a repeat within one batch counts too",
                batches: vec![vec![("a", live), ("a", live)]],
                marked: vec![vec!["2026"]],
            },
            Case {
                name: "any row into a past year's partition marks it, first row or not",
                batches: vec![
                    vec![("a", Y2024 + m)],
                    vec![("a", Y2025 + m), ("a", Y2025 + 2 * m)],
                ],
                marked: vec![vec!["2024"], vec!["2025"]],
            },
            Case {
                name: "series are independent: another pair's older candle is not late",
                batches: vec![vec![("a", live + 5 * m)], vec![("b", live)]],
                marked: vec![vec![], vec![]],
            },
            Case {
                name: "a backfill under a live stream marks every partition it touches",
                batches: vec![
                    vec![("a", live)],
                    vec![("a", Y2024), ("a", Y2025), ("a", Y2026), ("a", live - m)],
                ],
                marked: vec![vec![], vec!["2024", "2025", "2026"]],
            },
        ];
        for c in cases {
            let mut t = DirtyTracker::new(&KLINES);
            for (i, (batch, want)) in c.batches.iter().zip(&c.marked).enumerate() {
                let got = t.committed(batch.iter().map(|(s, k)| (s, *k)), now);
                let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
                assert_eq!(got, want, "{}: batch {i}", c.name);
            }
        }
    }

    /// The writer passes runs of rows that share one series value; a run's newest key must
    /// carry over to later runs of the same series, by the same or an equal value.
    #[test]
    fn runs_of_one_series_value_keep_the_rule() {
        let now = Y2026 + 300 * 86_400_000;
        let m = 60_000;
        let live = Y2026 + 299 * 86_400_000;
        let (a, b, a_again) = ("a".to_string(), "b".to_string(), "a".to_string());
        let mut t = DirtyTracker::new(&KLINES);
        let in_order = [(&a, live), (&a, live + m), (&b, live), (&a, live + 2 * m)];
        assert!(t.committed(in_order, now).is_empty(), "in order");
        // `a` at live + m again, first in a run of another reference to an equal value.
        let late = [
            (&b, live + m),
            (&a_again, live + m),
            (&a_again, live + 3 * m),
        ];
        assert_eq!(t.committed(late, now), BTreeSet::from(["2026".to_string()]));
        // The run wrote its newest key back: live + 3m is now behind for `a`.
        assert_eq!(
            t.committed([(&a, live + 3 * m)], now),
            BTreeSet::from(["2026".to_string()])
        );
        assert!(t
            .committed([(&a, live + 4 * m), (&b, live + 2 * m)], now)
            .is_empty());
    }

    #[test]
    fn marks_coalesce_until_taken() {
        let marks = DirtyMarks::default();
        marks.add("klines", BTreeSet::from(["2024".to_string()]));
        marks.add(
            "klines",
            BTreeSet::from(["2024".to_string(), "2025".to_string()]),
        );
        marks.add("klines", BTreeSet::new());
        assert_eq!(marks.pending(), 2);
        let taken = marks.take();
        assert_eq!(marks.pending(), 0);
        marks.put_back(taken);
        assert_eq!(marks.pending(), 2);
    }

    #[test]
    fn only_plain_partition_ids_reach_sql() {
        for ok in ["2024", "202401", "a1b2c3d4e5f6", "2024-01-01", "x_1"] {
            assert!(check_partition_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "2024'", "20 24", "a;b", "`x`"] {
            assert!(check_partition_id(bad).is_err(), "{bad}");
        }
    }
}
