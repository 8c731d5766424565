//! Historical backfill of one pair over `[start, end)`: clamp to the first available candle
//! and to the last closed one, skip what ClickHouse already holds and the exchange-confirmed
//! gaps, take whole months and days from the bulk archives where they exist, fetch the rest by
//! REST concurrently within the shared rate governor, and record ranges Binance has no candles
//! for. Works chunk by chunk so memory stays bounded whatever the range; idempotent, so a
//! rerun (also after `kill -9`) completes what is missing without duplicates.
//! It does not write rows itself (the writer does) nor decide what to backfill (the operator).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{stream, StreamExt};
use indicatif::ProgressBar;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BackfillConfig, BackfillSource};
use crate::exchange::archive::{ArchiveClient, ArchiveError, ArchiveFile};
use crate::exchange::rest::{grid, RestClient};
use crate::exchange::ExchangeError;
use crate::market::{
    month_start, next_month_start, Kline, Market, PairKey, Period, CM_MAX_RANGE_MS, DAY_MS,
};
use crate::store::writer::WriterHandle;
use crate::store::{Store, StoreError};

/// Monthly archives appear by the first Monday of the next month.
const MONTH_ARCHIVE_LAG_MS: i64 = 8 * DAY_MS;
/// Daily archives appear the next day.
const DAY_ARCHIVE_LAG_MS: i64 = DAY_MS;
/// The server-clock offset is re-measured when older than this.
const SERVER_TIME_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);
/// A missing candle is recorded as an exchange gap only once it closed this long ago.
const GAP_GRACE_MS: i64 = 10 * 60_000;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("invalid range: start {start} must be before end {end}")]
    InvalidRange { start: i64, end: i64 },
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("ClickHouse: {0}")]
    Store(#[from] StoreError),
    #[error("the kline writer stopped; rows cannot be stored")]
    WriterClosed,
    #[error("cancelled")]
    Cancelled,
}

/// What one backfill did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackfillSummary {
    /// The range actually covered after clamping (`None`: nothing to do).
    pub range: Option<(i64, i64)>,
    /// Candles on the grid in that range.
    pub expected: u64,
    /// Already stored (or known gaps) before this run.
    pub present: u64,
    pub rows_rest: u64,
    pub rows_archive: u64,
    pub archive_files: u64,
    /// Archive files that could not be used (missing, bad checksum, corrupt): REST instead.
    pub archive_fallbacks: u64,
    /// Candles Binance confirmed it does not have (recorded in `exchange_gaps`).
    pub gap_candles: u64,
}

#[derive(Default)]
struct Counters {
    rows_rest: AtomicU64,
    rows_archive: AtomicU64,
    archive_files: AtomicU64,
    archive_fallbacks: AtomicU64,
    gap_candles: AtomicU64,
}

/// Grid open times in `[from, to)` that are neither stored as closed candles nor known
/// exchange gaps (off-grid stored candles count for the slot they fall in).
pub async fn missing_candles(
    store: &Store,
    pair: &PairKey,
    from: i64,
    to: i64,
) -> Result<Vec<i64>, StoreError> {
    let stored: HashSet<i64> = store
        .final_open_times(pair, from, to)
        .await?
        .into_iter()
        .map(|t| pair.period.align(t))
        .collect();
    let gaps = store.exchange_gaps(pair, from, to).await?;
    Ok(grid(pair.period, from, to)
        .filter(|t| !stored.contains(t) && !gaps.iter().any(|&(s, e)| *t >= s && *t < e))
        .collect())
}

pub struct Backfill {
    rest: Arc<RestClient>,
    archive: Arc<ArchiveClient>,
    store: Store,
    writer: WriterHandle,
    cfg: BackfillConfig,
}

impl Backfill {
    pub fn new(
        rest: Arc<RestClient>,
        archive: Arc<ArchiveClient>,
        store: Store,
        writer: WriterHandle,
        cfg: BackfillConfig,
    ) -> Backfill {
        Backfill {
            rest,
            archive,
            store,
            writer,
            cfg,
        }
    }

    /// Backfills `pair` over `[start, end)` (open times, ms).
    pub async fn run(
        &self,
        pair: &PairKey,
        start: i64,
        end: i64,
        progress: &ProgressBar,
        cancel: &CancellationToken,
    ) -> Result<BackfillSummary, BackfillError> {
        if start >= end {
            return Err(BackfillError::InvalidRange { start, end });
        }
        // Unknown symbols fail here, before any klines request (this also adopts the budget).
        // A delisted contract can be missing from exchangeInfo while its klines are still
        // served: then the first-candle probe decides (-1121 = unknown).
        match self.rest.symbol_info(pair).await {
            Ok(_) => {}
            Err(ExchangeError::InvalidSymbol { .. }) if pair.market != Market::Cm => {
                warn!(%pair, "Symbol not in exchangeInfo; asking klines directly.");
            }
            Err(e) => return Err(e.into()),
        }
        let now = self
            .rest
            .server_time_within(pair.market, SERVER_TIME_MAX_AGE)
            .await?;
        let mut summary = BackfillSummary::default();
        let Some(first) = self.rest.first_open_time(pair, start, end).await? else {
            info!(%pair, "Binance has no candles for this pair.");
            return Ok(summary);
        };
        // The candle containing `now` is still open: never stored as final.
        let lo = start.max(first);
        let hi = end.min(pair.period.align(now));
        if lo >= hi {
            info!(%pair, first, "Nothing to backfill in the requested range.");
            return Ok(summary);
        }
        summary.range = Some((lo, hi));
        let counters = Counters::default();
        let total = grid(pair.period, lo, hi).count() as u64;
        summary.expected = total;
        progress.set_length(total);

        let mut cs = lo;
        while cs < hi {
            if cancel.is_cancelled() {
                return Err(BackfillError::Cancelled);
            }
            let ce = chunk_end(pair.period, cs).min(hi);
            let present = self
                .chunk(pair, cs, ce, now, progress, cancel, &counters)
                .await?;
            summary.present += present;
            cs = ce;
        }
        summary.rows_rest = counters.rows_rest.load(Ordering::Relaxed);
        summary.rows_archive = counters.rows_archive.load(Ordering::Relaxed);
        summary.archive_files = counters.archive_files.load(Ordering::Relaxed);
        summary.archive_fallbacks = counters.archive_fallbacks.load(Ordering::Relaxed);
        summary.gap_candles = counters.gap_candles.load(Ordering::Relaxed);
        Ok(summary)
    }

    /// One chunk `[cs, ce)`: returns how many candles were already present.
    #[allow(clippy::too_many_arguments)]
    async fn chunk(
        &self,
        pair: &PairKey,
        cs: i64,
        ce: i64,
        now: i64,
        progress: &ProgressBar,
        cancel: &CancellationToken,
        counters: &Counters,
    ) -> Result<u64, BackfillError> {
        let expected: Vec<i64> = grid(pair.period, cs, ce).collect();
        let mut missing = missing_candles(&self.store, pair, cs, ce).await?;
        let present = (expected.len() - missing.len()) as u64;
        progress.inc(present);
        if missing.is_empty() {
            return Ok(present);
        }
        debug!(%pair, cs, ce, missing = missing.len(), "Backfilling chunk.");

        if self.cfg.source != BackfillSource::Rest {
            for file in self.plan_archives(pair, cs, ce, now, &expected, &missing) {
                if cancel.is_cancelled() {
                    return Err(BackfillError::Cancelled);
                }
                missing = self
                    .take_archive(pair, file, missing, progress, counters)
                    .await?;
            }
        }
        if missing.is_empty() {
            return Ok(present);
        }
        let windows = rest_windows(pair, &missing);
        let results: Vec<Result<(), BackfillError>> = stream::iter(windows)
            .map(|(first, last, n)| self.rest_window(pair, first, last, n, progress, counters))
            .buffer_unordered(self.cfg.concurrency.max(1))
            .take_until(cancel.cancelled())
            .collect()
            .await;
        if cancel.is_cancelled() {
            return Err(BackfillError::Cancelled);
        }
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(present)
    }

    /// The archive files to try for a chunk: whole months (and, for periods of an hour or
    /// less, whole days) that are entirely missing and old enough to be published. With
    /// `source: archive`, any month or day with missing candles.
    fn plan_archives(
        &self,
        pair: &PairKey,
        cs: i64,
        ce: i64,
        now: i64,
        expected: &[i64],
        missing: &[i64],
    ) -> Vec<ArchiveFile> {
        let force = self.cfg.source == BackfillSource::Archive;
        let count_in = |v: &[i64], s: i64, e: i64| v.iter().filter(|&&t| t >= s && t < e).count();
        let mut files = Vec::new();
        let mut m = month_start(cs);
        while m < ce {
            let me = next_month_start(m);
            let whole_month = m >= cs && me <= ce;
            // `1s` works in daily chunks: a monthly file would be fetched once per day.
            let published = me + MONTH_ARCHIVE_LAG_MS <= now && pair.period != Period::S1;
            let miss = count_in(missing, m, me);
            if published
                && miss > 0
                && (force || (whole_month && miss == count_in(expected, m, me)))
            {
                files.push(ArchiveFile::Month(m));
            } else if pair.period.has_daily_archive()
                && pair.period.fixed_ms().is_some_and(|l| l <= 3_600_000)
            {
                let mut d = m.max(cs).div_euclid(DAY_MS) * DAY_MS;
                while d < me.min(ce) {
                    let de = d + DAY_MS;
                    let whole_day = d >= cs && de <= ce;
                    let miss = count_in(missing, d, de);
                    if de + DAY_ARCHIVE_LAG_MS <= now
                        && miss > 0
                        && (force || (whole_day && miss == count_in(expected, d, de)))
                    {
                        files.push(ArchiveFile::Day(d));
                    }
                    d = de;
                }
            }
            m = me;
        }
        files
    }

    /// Writes the missing candles found in `file`; returns what is still missing. Any archive
    /// problem leaves the file's range to REST.
    async fn take_archive(
        &self,
        pair: &PairKey,
        file: ArchiveFile,
        missing: Vec<i64>,
        progress: &ProgressBar,
        counters: &Counters,
    ) -> Result<Vec<i64>, BackfillError> {
        let (fs, fe) = (file.start(), file.end());
        let mut wanted: HashSet<i64> = missing
            .iter()
            .copied()
            .filter(|&t| t >= fs && t < fe)
            .collect();
        let (tx, mut rx) = mpsc::channel::<Vec<Kline>>(8);
        let fetch = self.archive.fetch(pair, file, tx);
        let consume = async {
            let mut written = 0u64;
            while let Some(mut chunk) = rx.recv().await {
                chunk.retain(|k| wanted.remove(&pair.period.align(k.open_time)));
                let n = chunk.len() as u64;
                self.writer
                    .send_many(chunk)
                    .await
                    .map_err(|_| BackfillError::WriterClosed)?;
                written += n;
                progress.inc(n);
            }
            Ok::<u64, BackfillError>(written)
        };
        let (fetched, written) = tokio::join!(fetch, consume);
        let written = written?;
        counters.rows_archive.fetch_add(written, Ordering::Relaxed);
        match fetched {
            Ok(rows) => {
                counters.archive_files.fetch_add(1, Ordering::Relaxed);
                debug!(%pair, file = file.name(pair), rows, written, "Archive file used.");
            }
            Err(e) => {
                counters.archive_fallbacks.fetch_add(1, Ordering::Relaxed);
                match &e {
                    ArchiveError::NotFound(_) => {
                        debug!(%pair, file = file.name(pair), "No archive file; using REST.")
                    }
                    _ => {
                        warn!(%pair, file = file.name(pair), error = %e, "Archive unusable; using REST.")
                    }
                }
            }
        }
        // Whatever the archive did not provide goes to REST (which also confirms gaps).
        Ok(missing
            .into_iter()
            .filter(|t| *t < fs || *t >= fe || wanted.contains(t))
            .collect())
    }

    /// Fetches the `n` grid candles from `first` to `last` (open times) by REST, paginating as
    /// the market requires, writes the closed ones and records confirmed gaps.
    async fn rest_window(
        &self,
        pair: &PairKey,
        first: i64,
        last: i64,
        n: usize,
        progress: &ProgressBar,
        counters: &Counters,
    ) -> Result<(), BackfillError> {
        let limit = u32::try_from(n)
            .unwrap_or(u32::MAX)
            .clamp(1, pair.market.max_klines_limit());
        let period = pair.period;
        let after_last = period.next_open(last);
        // Grid slots seen (candles are matched to slots by alignment: early history has
        // candles a few seconds off the grid).
        let mut got: HashSet<i64> = HashSet::new();
        let (mut s, mut e) = (first, period.close_time(last));
        let mut server_now;
        // Page until every slot of the window is known: returned, or absent with the
        // exchange's word for it (spot/um pages hold every row from startTime on; COIN-M
        // pages every row up to endTime). A short page is not taken as proof: one more
        // request must come back empty.
        loop {
            let page = self.rest.klines(pair, Some(s), Some(e), limit).await?;
            server_now = page.server_now;
            let rows: Vec<Kline> = page
                .rows
                .into_iter()
                .filter(|k| k.open_time >= first && k.open_time < after_last)
                .collect();
            let bounds = (
                rows.iter().map(|k| period.align(k.open_time)).min(),
                rows.iter().map(|k| period.align(k.open_time)).max(),
            );
            let fresh: Vec<Kline> = rows
                .into_iter()
                .filter(|k| k.is_final && got.insert(period.align(k.open_time)))
                .collect();
            let n = fresh.len() as u64;
            self.writer
                .send_many(fresh)
                .await
                .map_err(|_| BackfillError::WriterClosed)?;
            counters.rows_rest.fetch_add(n, Ordering::Relaxed);
            progress.inc(n);
            let (Some(min_t), Some(max_t)) = bounds else {
                break; // nothing in [s, e]
            };
            match pair.market {
                Market::Spot | Market::Um => {
                    let next = period.next_open(max_t);
                    if next > last {
                        break;
                    }
                    if next <= s {
                        return Err(no_progress(pair, s, e));
                    }
                    s = next;
                }
                Market::Cm => {
                    if min_t <= first {
                        break;
                    }
                    if min_t > e {
                        return Err(no_progress(pair, s, e));
                    }
                    e = min_t - 1;
                }
            }
        }
        // Absent slots are confirmed gaps once they are safely past: the newest closed
        // candle can appear with a lag, so recent ones are left for the next run.
        let absent: Vec<i64> = grid(period, first, after_last)
            .filter(|t| !got.contains(t) && period.close_time(*t) + GAP_GRACE_MS < server_now)
            .collect();
        for (gs, ge) in runs(period, &absent) {
            self.store.record_gap(pair, gs, ge).await?;
            let count = grid(period, gs, ge).count() as u64;
            counters.gap_candles.fetch_add(count, Ordering::Relaxed);
            progress.inc(count);
            info!(%pair, start_ms = gs, end_ms = ge, candles = count,
                "Binance has no candles here (maintenance?); gap recorded.");
        }
        Ok(())
    }
}

/// A reply that did not move the page forward (an exchange ignoring startTime/endTime).
fn no_progress(pair: &PairKey, s: i64, e: i64) -> BackfillError {
    BackfillError::Exchange(ExchangeError::Protocol {
        url: format!("{} klines", pair.market),
        msg: format!(
            "{pair}: the page for startTime={s} endTime={e} did not advance; the exchange ignores the time range"
        ),
    })
}

/// Where the chunk starting at `t` ends: a day for `1s`, a year for daily and longer periods,
/// a month otherwise (bounded memory per chunk).
fn chunk_end(period: Period, t: i64) -> i64 {
    match period {
        Period::S1 => (t.div_euclid(DAY_MS) + 1) * DAY_MS,
        Period::D1 | Period::D3 | Period::W1 | Period::Mo1 => {
            (0..12).fold(t, |m, _| next_month_start(m))
        }
        _ => next_month_start(t),
    }
}

/// Groups sorted grid open times into runs of consecutive candles: `[start, end)` each.
fn runs(period: Period, times: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &t in times {
        match out.last_mut() {
            Some((_, e)) if *e == t => *e = period.next_open(t),
            _ => out.push((t, period.next_open(t))),
        }
    }
    out
}

/// Splits the missing candles into REST requests: (first open, last open, count), each at
/// most the market's most weight-efficient page and, on COIN-M, within 200 days.
fn rest_windows(pair: &PairKey, missing: &[i64]) -> Vec<(i64, i64, usize)> {
    let limit = pair.market.efficient_klines_limit() as usize;
    let mut out = Vec::new();
    for (rs, re) in runs(pair.period, missing) {
        let mut first: Option<i64> = None;
        let mut last = rs;
        let mut n = 0usize;
        for t in grid(pair.period, rs, re) {
            let start = *first.get_or_insert(t);
            let too_long =
                pair.market == Market::Cm && pair.period.close_time(t) - start >= CM_MAX_RANGE_MS;
            if n == limit || too_long {
                out.push((start, last, n));
                first = Some(t);
                n = 0;
            }
            last = t;
            n += 1;
        }
        if let Some(start) = first {
            out.push((start, last, n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_windows_cover_missing_candles_exactly() {
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let m = 60_000;
        let missing: Vec<i64> = (0..3000).chain(5000..5010).map(|i| i * m).collect();
        let windows = rest_windows(&pair, &missing);
        assert_eq!(windows.len(), 8);
        assert_eq!(windows[0], (0, 498 * m, 499));
        assert_eq!(windows[6], (2994 * m, 2999 * m, 6));
        assert_eq!(windows[7], (5000 * m, 5009 * m, 10));
        assert_eq!(windows.iter().map(|w| w.2).sum::<usize>(), 3010);
        assert_eq!(
            runs(Period::M1, &[0, m, 3 * m]),
            vec![(0, 2 * m), (3 * m, 4 * m)]
        );
    }

    #[test]
    fn coin_m_windows_stay_within_200_days() {
        let pair = PairKey::parse("cm", "BTCUSD_PERP", "1d").unwrap();
        let missing: Vec<i64> = (0..500).map(|i| i * DAY_MS).collect();
        let windows = rest_windows(&pair, &missing);
        for (first, last, n) in &windows {
            assert!(pair.period.close_time(*last) - first < CM_MAX_RANGE_MS);
            assert!(*n <= 200);
        }
        assert_eq!(windows.iter().map(|w| w.2).sum::<usize>(), 500);
    }

    #[test]
    fn chunks_are_bounded() {
        let t = 1_704_067_200_000; // 2024-01-01
        assert_eq!(chunk_end(Period::S1, t + 5), t + DAY_MS);
        assert_eq!(chunk_end(Period::M1, t), 1_706_745_600_000);
        assert_eq!(chunk_end(Period::D1, t), 1_735_689_600_000); // 2025-01-01
    }
}
