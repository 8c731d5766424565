//! The indicator computations' side of ClickHouse: a pair's stored closed candles in
//! `open_time` order (the series indicators run over), chunk by chunk; durable checkpoints
//! (`indicator_checkpoints`: the row layout, and finding one); observed state
//! (`indicator_status`). Values and checkpoints are written by the writer.

use serde::{Deserialize, Serialize};

use super::writer::Checkpoint;
use super::{Store, StoreError, PAIR_KLINE_COLUMNS};
use crate::market::{Kline, PairKey};

impl Store {
    /// How many closed candles of the pair are stored (deduplicated).
    pub async fn count_final_klines(&self, pair: &PairKey) -> Result<u64, StoreError> {
        self.call(
            self.client
                .query(
                    "SELECT count() FROM klines FINAL \
                     WHERE market = ? AND symbol = ? AND period = ? AND is_final = 1",
                )
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .fetch_one::<u64>(),
        )
        .await
    }

    /// Up to `limit` stored closed candles of the pair with `open_time > after`, deduplicated
    /// (`FINAL`), in `open_time` order: one chunk of the pair's series. Fewer than `limit`
    /// means the series ends there.
    ///
    /// `FINAL` with `ORDER BY … LIMIT` does not stop early (18.16 merges every row after
    /// `after` before limiting), so the chunk is read through windows of the primary key
    /// (`limit` periods wide) that cover only what it needs: a whole series costs one pass
    /// instead of one pass per chunk. A window that comes back empty (a hole at least as
    /// wide) is followed by a jump to the next stored candle (found without `FINAL`: a final
    /// candle is only ever replaced by a final one, so the bounds are the same); that lookup
    /// counts every later row, so it is only made then.
    pub async fn final_klines_after(
        &self,
        pair: &PairKey,
        after: i64,
        limit: u64,
    ) -> Result<Vec<Kline>, StoreError> {
        // A month is at most 31 days: windows for `1M` are wide enough, never too narrow.
        let period = pair.period.longest_ms();
        let span = period.saturating_mul(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut out: Vec<Kline> = Vec::new();
        let mut after = after;
        while (out.len() as u64) < limit {
            // The window: from just after `after`, `limit` periods wide.
            let upto = after.saturating_add(span).saturating_add(1);
            let want = limit - out.len() as u64;
            let chunk = self
                .fetch_pair_klines(
                    pair,
                    self.client
                        .query(&format!(
                            "SELECT {PAIR_KLINE_COLUMNS} FROM klines FINAL \
                             WHERE market = ? AND symbol = ? AND period = ? \
                             AND open_time > ? AND open_time < ? \
                             AND is_final = 1 ORDER BY open_time LIMIT ?"
                        ))
                        .bind(pair.market.as_str())
                        .bind(pair.symbol.as_str())
                        .bind(pair.period.as_str())
                        .bind(after)
                        .bind(upto)
                        .bind(want),
                )
                .await?;
            if chunk.is_empty() {
                // A hole at least a window wide (or the end): jump to the next stored candle.
                match self.next_final_open_time(pair, after).await? {
                    Some(next) => {
                        after = next - 1;
                        continue;
                    }
                    None => break,
                }
            }
            let full = chunk.len() as u64 == want;
            after = match chunk.last() {
                Some(k) if full => k.open_time,
                _ => upto - 1,
            };
            out.extend(chunk);
        }
        Ok(out)
    }

    /// The first `open_time` of a closed candle of the pair after `after`, if any (cheap: no
    /// `FINAL`, only the key columns).
    async fn next_final_open_time(
        &self,
        pair: &PairKey,
        after: i64,
    ) -> Result<Option<i64>, StoreError> {
        let (n, first) = self
            .call(
                self.client
                    .query(
                        "SELECT count(), min(open_time) FROM klines \
                         WHERE market = ? AND symbol = ? AND period = ? AND open_time > ? \
                         AND is_final = 1",
                    )
                    .bind(pair.market.as_str())
                    .bind(pair.symbol.as_str())
                    .bind(pair.period.as_str())
                    .bind(after)
                    .fetch_one::<(u64, i64)>(),
            )
            .await?;
        Ok((n > 0).then_some(first))
    }
}

/// One `indicator_checkpoints` row in column order.
#[derive(clickhouse::Row, Serialize, Deserialize)]
pub(crate) struct CheckpointRow<S> {
    market: S,
    symbol: S,
    period: S,
    indicator: S,
    pub(crate) open_time: i64,
    pub(crate) bars: u64,
    pub(crate) state: S,
    version: u64,
}

impl<'a> CheckpointRow<&'a str> {
    pub(crate) fn new(c: &'a Checkpoint, version: u64) -> CheckpointRow<&'a str> {
        CheckpointRow {
            market: c.pair.market.as_str(),
            symbol: c.pair.symbol.as_str(),
            period: c.pair.period.as_str(),
            indicator: &c.indicator,
            open_time: c.open_time,
            bars: c.bars,
            state: &c.state,
            version,
        }
    }
}

/// A stored checkpoint: the state after the candle at `open_time`, `bars` candles in.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct StoredCheckpoint {
    pub open_time: i64,
    pub bars: u64,
    pub state: String,
}

/// One `indicator_status` row.
#[derive(Debug, Clone, clickhouse::Row, Serialize)]
struct IndicatorStatusRow<'a> {
    market: &'a str,
    symbol: &'a str,
    period: &'a str,
    indicator: &'a str,
    phase: &'a str,
    last_open_time: i64,
    last_error: &'a str,
    updated_at: u32,
}

impl Store {
    /// How many closed candles of the pair are stored with `open_time <= t`.
    pub async fn count_final_klines_upto(&self, pair: &PairKey, t: i64) -> Result<u64, StoreError> {
        self.call(
            self.client
                .query(
                    "SELECT count() FROM klines FINAL \
                     WHERE market = ? AND symbol = ? AND period = ? AND is_final = 1 \
                     AND open_time <= ?",
                )
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .bind(t)
                .fetch_one::<u64>(),
        )
        .await
    }

    /// The newest checkpoint of the pair's `indicator` with `open_time < before`.
    pub async fn checkpoint_before(
        &self,
        pair: &PairKey,
        indicator: &str,
        before: i64,
    ) -> Result<Option<StoredCheckpoint>, StoreError> {
        let rows: Vec<StoredCheckpoint> = self
            .call(
                self.client
                    .query(
                        "SELECT open_time, bars, state FROM indicator_checkpoints FINAL \
                         WHERE market = ? AND symbol = ? AND period = ? AND indicator = ? \
                         AND open_time < ? ORDER BY open_time DESC LIMIT 1",
                    )
                    .bind(pair.market.as_str())
                    .bind(pair.symbol.as_str())
                    .bind(pair.period.as_str())
                    .bind(indicator)
                    .bind(before)
                    .fetch_all::<StoredCheckpoint>(),
            )
            .await?;
        Ok(rows.into_iter().next())
    }

    /// Appends an `indicator_status` row (the latest per pair and indicator wins).
    pub async fn write_indicator_status(
        &self,
        pair: &PairKey,
        indicator: &str,
        phase: &str,
        last_open_time: i64,
        last_error: &str,
    ) -> Result<(), StoreError> {
        let row = IndicatorStatusRow {
            market: pair.market.as_str(),
            symbol: pair.symbol.as_str(),
            period: pair.period.as_str(),
            indicator,
            phase,
            last_open_time,
            last_error,
            updated_at: u32::try_from(crate::market::now_ms() / 1000).unwrap_or(u32::MAX),
        };
        let client = self.client.clone();
        self.call(async move {
            let mut insert = client
                .insert::<IndicatorStatusRow<'_>>("indicator_status")
                .await?;
            insert.write(&row).await?;
            insert.end().await
        })
        .await
    }
}
