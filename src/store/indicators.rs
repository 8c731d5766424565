//! Reads for the indicator computations: a pair's stored closed candles in `open_time` order
//! (the series indicators run over), chunk by chunk. Rows of `indicators` are written by the
//! writer; this module only reads.

use super::{KlineRow, Store, StoreError, KLINE_COLUMNS};
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
    /// (`FINAL`), in `open_time` order: one chunk of the pair's series.
    pub async fn final_klines_after(
        &self,
        pair: &PairKey,
        after: i64,
        limit: u64,
    ) -> Result<Vec<Kline>, StoreError> {
        let rows: Vec<KlineRow<String>> = self
            .call(
                self.client
                    .query(&format!(
                        "SELECT {KLINE_COLUMNS} FROM klines FINAL \
                         WHERE market = ? AND symbol = ? AND period = ? AND open_time > ? \
                         AND is_final = 1 ORDER BY open_time LIMIT ?"
                    ))
                    .bind(pair.market.as_str())
                    .bind(pair.symbol.as_str())
                    .bind(pair.period.as_str())
                    .bind(after)
                    .bind(limit)
                    .fetch_all::<KlineRow<String>>(),
            )
            .await?;
        rows.into_iter()
            .map(KlineRow::into_kline)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Protocol)
    }
}
