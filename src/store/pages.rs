//! Stored candles paged as Binance's klines endpoint pages them (what the REST facade serves):
//! the first `limit` candles from a start, or the newest `limit` up to an end, with inclusive
//! bounds on `open_time`, deduplicated (`FINAL`: the closed version beats the in-progress one,
//! then the newest ingest wins), read through primary-key windows so that a page costs about
//! what it returns; and which symbols of a market are known (stored or declared). Which page a
//! request asks for (Binance's parameter rules per market) is the facade's business, not this.

use super::{Store, StoreError, PAIR_KLINE_COLUMNS};
use crate::market::{Kline, Market, PairKey, Symbol};

impl Store {
    /// A page of the pair's stored candles as Binance's klines endpoint answers it (spot and
    /// USD-M rules): with `start`, the first `limit` candles with `start <= open_time <= end`;
    /// without, the newest `limit` with `open_time <= end`. No `end` = no upper bound. Oldest
    /// first. Closed candles and the stored in-progress one alike, latest version of each.
    pub async fn klines_page(
        &self,
        pair: &PairKey,
        start: Option<i64>,
        end: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Kline>, StoreError> {
        let end = end.unwrap_or(i64::MAX);
        match start {
            Some(start) => self.first_klines(pair, start, end, limit).await,
            None => self.last_klines(pair, i64::MIN, end, limit).await,
        }
    }

    /// The first `limit` stored candles with `from <= open_time <= to`, oldest first.
    ///
    /// `FINAL … ORDER BY open_time LIMIT n` does not stop early (18.16 merges every row after
    /// the start before limiting), so the rows are read through windows of the primary key
    /// `limit` periods wide: one query when the pair has no hole there. When a window comes
    /// back short (a hole, or the end of the series), the next one starts at the next stored
    /// candle, found without `FINAL` (every version of a candle has the same `open_time`).
    pub async fn first_klines(
        &self,
        pair: &PairKey,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<Kline>, StoreError> {
        let span = window_span(pair, limit);
        let limit = u64::from(limit);
        let mut out: Vec<Kline> = Vec::new();
        let mut cursor = from;
        while (out.len() as u64) < limit && cursor <= to {
            // [cursor, upto] holds at most `limit` open times of the grid.
            let upto = cursor.saturating_add(span - 1).min(to);
            let want = limit - out.len() as u64;
            let chunk = self
                .fetch_pair_klines(
                    pair,
                    self.client
                        .query(&format!(
                            "SELECT {PAIR_KLINE_COLUMNS} FROM klines FINAL \
                             WHERE market = ? AND symbol = ? AND period = ? \
                             AND open_time >= ? AND open_time <= ? \
                             ORDER BY open_time LIMIT ?"
                        ))
                        .bind(pair.market.as_str())
                        .bind(pair.symbol.as_str())
                        .bind(pair.period.as_str())
                        .bind(cursor)
                        .bind(upto)
                        .bind(want),
                )
                .await?;
            let short = (chunk.len() as u64) < want;
            out.extend(chunk);
            if !short || upto >= to {
                break;
            }
            // The window is exhausted: go on from the next stored candle after it.
            match self
                .stored_open_time(pair, upto + 1, to, Edge::First)
                .await?
            {
                Some(next) => cursor = next,
                None => break,
            }
        }
        Ok(out)
    }

    /// The newest `limit` stored candles with `from <= open_time <= to`, oldest first. Read
    /// through windows like [`Store::first_klines`], downwards from `to`; with no `to`
    /// (`i64::MAX`), the first window is the one just before now (where a live pair's newest
    /// candles are), then the newest stored candle's.
    pub async fn last_klines(
        &self,
        pair: &PairKey,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<Kline>, StoreError> {
        let span = window_span(pair, limit);
        let limit = u64::from(limit);
        // A stored candle can open at most one period after our clock (clock skew): the
        // first window's top reaches that far, the query itself goes up to `to`.
        let period = pair.period.longest_ms();
        let now = crate::market::now_ms();
        let mut top = to.min(now.saturating_add(period));
        let mut newest_first: Vec<Kline> = Vec::new();
        let mut upper = to;
        while (newest_first.len() as u64) < limit && upper >= from {
            // [lowest, top] holds at most `limit` open times of the grid.
            let lowest = top.saturating_sub(span - 1).max(from);
            let want = limit - newest_first.len() as u64;
            let chunk = self
                .fetch_pair_klines(
                    pair,
                    self.client
                        .query(&format!(
                            "SELECT {PAIR_KLINE_COLUMNS} FROM klines FINAL \
                             WHERE market = ? AND symbol = ? AND period = ? \
                             AND open_time >= ? AND open_time <= ? \
                             ORDER BY open_time DESC LIMIT ?"
                        ))
                        .bind(pair.market.as_str())
                        .bind(pair.symbol.as_str())
                        .bind(pair.period.as_str())
                        .bind(lowest)
                        .bind(upper)
                        .bind(want),
                )
                .await?;
            let short = (chunk.len() as u64) < want;
            newest_first.extend(chunk);
            if !short || lowest <= from {
                break;
            }
            // The window is exhausted: go on from the previous stored candle before it.
            match self
                .stored_open_time(pair, from, lowest - 1, Edge::Last)
                .await?
            {
                Some(prev) => {
                    top = prev;
                    upper = prev;
                }
                None => break,
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The first (or last) `open_time` of the pair's stored rows in `[from, to]`, if any.
    /// Cheap next to `FINAL`: no merge, only the key columns.
    async fn stored_open_time(
        &self,
        pair: &PairKey,
        from: i64,
        to: i64,
        edge: Edge,
    ) -> Result<Option<i64>, StoreError> {
        let agg = match edge {
            Edge::First => "min",
            Edge::Last => "max",
        };
        let (n, t) = self
            .call(
                self.client
                    .query(&format!(
                        "SELECT count(), {agg}(open_time) FROM klines \
                         WHERE market = ? AND symbol = ? AND period = ? \
                         AND open_time >= ? AND open_time <= ?"
                    ))
                    .bind(pair.market.as_str())
                    .bind(pair.symbol.as_str())
                    .bind(pair.period.as_str())
                    .bind(from)
                    .bind(to)
                    .fetch_one::<(u64, i64)>(),
            )
            .await?;
        Ok((n > 0).then_some(t))
    }

    /// Whether `symbol` is known on `market`: it has stored candles (of any period) or is
    /// declared in `trading_pairs` (enabled or not). Two short reads that stop at the first row.
    pub async fn symbol_known(&self, market: Market, symbol: &Symbol) -> Result<bool, StoreError> {
        for table in ["klines", "trading_pairs"] {
            let rows: Vec<u8> = self
                .call(
                    self.client
                        .query(&format!(
                            "SELECT 1 FROM {table} WHERE market = ? AND symbol = ? LIMIT 1"
                        ))
                        .bind(market.as_str())
                        .bind(symbol.as_str())
                        .fetch_all::<u8>(),
                )
                .await?;
            if !rows.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The symbols known on `market` (see [`Store::symbol_known`]), sorted. Reads the
    /// `symbol` column of the market's stored rows: meant for listings, not for every request.
    /// Declared symbols that are not valid Binance symbols are left out.
    pub async fn known_symbols(&self, market: Market) -> Result<Vec<Symbol>, StoreError> {
        let mut all: Vec<Symbol> = Vec::new();
        for table in ["klines", "trading_pairs"] {
            let names: Vec<String> = self
                .call(
                    self.client
                        .query(&format!(
                            "SELECT symbol FROM {table} WHERE market = ? GROUP BY symbol"
                        ))
                        .bind(market.as_str())
                        .fetch_all::<String>(),
                )
                .await?;
            all.extend(names.iter().filter_map(|s| s.parse::<Symbol>().ok()));
        }
        all.sort();
        all.dedup();
        Ok(all)
    }
}

/// Which end of a range of stored open times.
#[derive(Debug, Clone, Copy)]
enum Edge {
    First,
    Last,
}

/// How wide a window of `limit` periods of the pair is, in ms (at least 1).
fn window_span(pair: &PairKey, limit: u32) -> i64 {
    let period = pair.period.longest_ms();
    period.saturating_mul(i64::from(limit.max(1)))
}
