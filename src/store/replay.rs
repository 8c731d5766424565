//! The client server's reads: whether a pair is known (declared or stored), and a pair's
//! stored indicator values in `open_time` order, one candle's outputs together, chunk by chunk
//! (the replay of an indicators subscription; candles are read with
//! [`Store::final_klines_after`]).

use serde::Deserialize;

use super::{Store, StoreError};
use crate::market::PairKey;
use crate::server::hub::IndicatorEvent;
use crate::tasks::indicators::api::Spec;

#[derive(clickhouse::Row, Deserialize)]
struct ValueRow {
    open_time: i64,
    output: String,
    value: f64,
}

impl Store {
    /// Whether the pair is declared in `trading_pairs` or has candles stored.
    pub async fn pair_known(&self, pair: &PairKey) -> Result<bool, StoreError> {
        let declared: u64 = self
            .call(
                self.client
                    .query(
                        "SELECT count() FROM trading_pairs \
                         WHERE market = ? AND symbol = ? AND period = ?",
                    )
                    .bind(pair.market.as_str())
                    .bind(pair.symbol.as_str())
                    .bind(pair.period.as_str())
                    .fetch_one::<u64>(),
            )
            .await?;
        if declared > 0 {
            return Ok(true);
        }
        let stored: u64 = self
            .call(
                self.client
                    .query(
                        "SELECT count() FROM (SELECT 1 FROM klines \
                         WHERE market = ? AND symbol = ? AND period = ? LIMIT 1)",
                    )
                    .bind(pair.market.as_str())
                    .bind(pair.symbol.as_str())
                    .bind(pair.period.as_str())
                    .fetch_one::<u64>(),
            )
            .await?;
        Ok(stored > 0)
    }

    /// At least `limit` candles' stored values of one indicator of the pair with
    /// `open_time > after` (or all that are left), deduplicated (`FINAL`), in `open_time`
    /// order, each candle's outputs in the spec's order. Fewer than `limit` means the end.
    ///
    /// Read through primary-key windows `limit` periods wide, as
    /// [`Store::final_klines_after`] does and for the same reason (`FINAL … LIMIT` does not stop
    /// early on 18.16).
    pub async fn indicator_events_after(
        &self,
        pair: &PairKey,
        spec: &Spec,
        after: i64,
        limit: u64,
    ) -> Result<Vec<IndicatorEvent>, StoreError> {
        let name = spec.to_string();
        let outputs = spec.outputs();
        let period = pair.period.fixed_ms().unwrap_or(31 * 86_400_000);
        let span = period.saturating_mul(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut out: Vec<IndicatorEvent> = Vec::new();
        let mut after = after;
        while (out.len() as u64) < limit {
            let (n, next) = self
                .call(
                    self.client
                        .query(
                            "SELECT count(), min(open_time) FROM indicators \
                             WHERE market = ? AND symbol = ? AND period = ? AND indicator = ? \
                             AND open_time > ?",
                        )
                        .bind(pair.market.as_str())
                        .bind(pair.symbol.as_str())
                        .bind(pair.period.as_str())
                        .bind(&name)
                        .bind(after)
                        .fetch_one::<(u64, i64)>(),
                )
                .await?;
            if n == 0 {
                break;
            }
            let upto = next.saturating_add(span);
            let rows: Vec<ValueRow> = self
                .call(
                    self.client
                        .query(
                            "SELECT open_time, output, value FROM indicators FINAL \
                             WHERE market = ? AND symbol = ? AND period = ? AND indicator = ? \
                             AND open_time > ? AND open_time < ? ORDER BY open_time, output",
                        )
                        .bind(pair.market.as_str())
                        .bind(pair.symbol.as_str())
                        .bind(pair.period.as_str())
                        .bind(&name)
                        .bind(after)
                        .bind(upto)
                        .fetch_all::<ValueRow>(),
                )
                .await?;
            for r in rows {
                let Some(slot) = outputs.iter().position(|o| *o == r.output) else {
                    continue; // an output this spec does not have (none are written)
                };
                if out.last().is_none_or(|e| e.open_time != r.open_time) {
                    out.push(IndicatorEvent {
                        open_time: r.open_time,
                        values: outputs.iter().map(|o| (*o, f64::NAN)).collect(),
                    });
                }
                if let Some(e) = out.last_mut() {
                    e.values[slot].1 = r.value;
                }
            }
            after = upto - 1;
        }
        Ok(out)
    }
}
