//! The client server's reads: whether a pair is known (declared or stored), and a pair's
//! stored indicator values in `open_time` order, one candle's outputs together, chunk by chunk
//! (the replay of an indicators subscription; candles are read with
//! [`Store::final_klines_after`]).

use serde::Deserialize;

use super::{Store, StoreError};
use crate::market::PairKey;
use qs_core::indicators::Spec;

/// One indicator's outputs at one candle (in the spec's output order).
#[derive(Debug, Clone, PartialEq)]
pub struct IndicatorEvent {
    pub open_time: i64,
    pub values: Vec<(&'static str, f64)>,
}

impl IndicatorEvent {
    /// Adds one stored value of output `output` (rows come in `open_time` order) to `events`:
    /// a new event for a new candle, its outputs not yet seen NaN. False (nothing added) if
    /// `output` is not one of `outputs`.
    pub fn add(
        events: &mut Vec<IndicatorEvent>,
        outputs: &[&'static str],
        open_time: i64,
        output: &str,
        value: f64,
    ) -> bool {
        let Some(slot) = outputs.iter().position(|o| *o == output) else {
            return false;
        };
        if events.last().is_none_or(|e| e.open_time != open_time) {
            events.push(IndicatorEvent {
                open_time,
                values: outputs.iter().map(|o| (*o, f64::NAN)).collect(),
            });
        }
        if let Some(e) = events.last_mut() {
            e.values[slot].1 = value;
        }
        true
    }
}

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
        let period = pair.period.longest_ms();
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
                // An output this spec does not have is skipped (none are written).
                IndicatorEvent::add(&mut out, outputs, r.open_time, &r.output, r.value);
            }
            after = upto - 1;
        }
        Ok(out)
    }
}

/// A series the standalone client server follows: new rows of it with `open_time >= floor`.
#[derive(Debug, Clone)]
pub struct Followed {
    pub pair: PairKey,
    /// `None`: the pair's candles; else one indicator of it.
    pub indicator: Option<Spec>,
    pub floor: i64,
}

/// One stored indicator value with its version, for the follower.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct FollowedValue {
    pub market: String,
    pub symbol: String,
    pub period: String,
    pub indicator: String,
    pub open_time: i64,
    pub output: String,
    pub value: f64,
    pub version: u64,
}

/// `(market = ? AND symbol = ? AND period = ? [AND indicator = ?] AND open_time >= ?) OR …`
/// for `series` (all of one kind), and its bindings in order.
fn series_condition(series: &[&Followed]) -> String {
    series
        .iter()
        .map(|f| {
            if f.indicator.is_some() {
                "(market = ? AND symbol = ? AND period = ? AND indicator = ? AND open_time >= ?)"
            } else {
                "(market = ? AND symbol = ? AND period = ? AND open_time >= ?)"
            }
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

fn bind_series(mut q: clickhouse::query::Query, series: &[&Followed]) -> clickhouse::query::Query {
    for f in series {
        q = q
            .bind(f.pair.market.as_str())
            .bind(f.pair.symbol.as_str())
            .bind(f.pair.period.as_str());
        if let Some(spec) = &f.indicator {
            q = q.bind(spec.to_string());
        }
        q = q.bind(f.floor);
    }
    q
}

impl Store {
    /// The newest `ingested_at` (ms) of `klines` and `version` (µs) of `indicators`: where
    /// a follower starts.
    pub async fn follow_marks(&self) -> Result<(i64, u64), StoreError> {
        let k = self
            .call(
                self.client
                    .query("SELECT max(ingested_at) FROM klines")
                    .fetch_one::<i64>(),
            )
            .await?;
        let i = self
            .call(
                self.client
                    .query("SELECT max(version) FROM indicators")
                    .fetch_one::<u64>(),
            )
            .await?;
        Ok((k, i))
    }

    /// Closed candles of the followed pairs ingested after `after_ms` (by `ingested_at`), with
    /// their `ingested_at`, oldest ingest first.
    pub async fn klines_ingested_after(
        &self,
        series: &[&Followed],
        after_ms: i64,
    ) -> Result<Vec<(crate::market::Kline, i64)>, StoreError> {
        if series.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {} FROM klines WHERE is_final = 1 AND ingested_at > ? AND ({}) \
             ORDER BY ingested_at, market, symbol, period, open_time",
            super::KLINE_COLUMNS,
            series_condition(series)
        );
        let q = bind_series(self.client.query(&sql).bind(after_ms), series);
        let rows = self.call(q.fetch_all::<super::KlineRow<String>>()).await?;
        rows.into_iter()
            .map(|r| {
                let ingested = r.ingested_at;
                r.into_kline().map(|k| (k, ingested))
            })
            .collect::<Result<_, _>>()
            .map_err(StoreError::Protocol)
    }

    /// Values of the followed indicators computed after `after_us` (by `version`), by series
    /// and `open_time`.
    pub async fn indicator_values_after(
        &self,
        series: &[&Followed],
        after_us: u64,
    ) -> Result<Vec<FollowedValue>, StoreError> {
        if series.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT market, symbol, period, indicator, open_time, output, value, version \
             FROM indicators WHERE version > ? AND ({}) \
             ORDER BY market, symbol, period, indicator, open_time, output, version",
            series_condition(series)
        );
        let q = bind_series(self.client.query(&sql).bind(after_us), series);
        self.call(q.fetch_all::<FollowedValue>()).await
    }
}
