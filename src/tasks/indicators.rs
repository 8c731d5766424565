//! Indicator computation over a pair's series (its stored closed candles in `open_time` order,
//! from the first one): the per-pair set of incremental states ([`SeriesState`]) that turns each
//! candle into `indicators` rows, and the offline run over the stored history
//! ([`compute_stored`]) behind `quantservice indicators`. The indicators themselves are the pure
//! `qs_core::indicators`.

use std::io::Write;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use api::{Bar, Indicator, Spec};
pub use qs_core::indicators as api;

use crate::market::{Kline, PairKey};
use crate::store::writer::{IndicatorValue, WriterHandle};
use crate::store::{Store, StoreError};

/// Candles read from ClickHouse per query of an offline run.
pub const READ_CHUNK: u64 = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum IndicatorError {
    #[error("no stored candles for {0} (backfill it first: quantservice backfill-gap)")]
    NoCandles(PairKey),
    #[error("cannot read the candles of {pair}: {source}")]
    Read { pair: PairKey, source: StoreError },
    #[error("the writer has stopped; indicator values of {0} were not all written")]
    WriterClosed(PairKey),
    #[error("cannot write the CSV: {0}")]
    Csv(#[from] std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

/// One indicator of a series with its output buffer.
#[derive(Debug, Clone)]
struct Slot {
    ind: Indicator,
    /// The normalised spec, shared by every row.
    name: Arc<str>,
    out: Vec<f64>,
    defined: bool,
}

/// The incremental states of a pair's indicators, advanced together one closed candle at a
/// time (each candle converted to a [`Bar`] once).
#[derive(Debug, Clone)]
pub struct SeriesState {
    pair: PairKey,
    slots: Vec<Slot>,
    /// Open time of the last candle fed.
    last: Option<i64>,
}

impl SeriesState {
    pub fn new(pair: PairKey, specs: &[Spec]) -> SeriesState {
        let slots = specs
            .iter()
            .map(|s| Slot {
                ind: Indicator::new(s),
                name: Arc::from(s.to_string()),
                out: vec![f64::NAN; s.outputs().len()],
                defined: false,
            })
            .collect();
        SeriesState {
            pair,
            slots,
            last: None,
        }
    }

    pub fn pair(&self) -> &PairKey {
        &self.pair
    }

    /// Open time of the last candle fed.
    pub fn last_open_time(&self) -> Option<i64> {
        self.last
    }

    /// Feeds one closed candle to every indicator.
    pub fn advance(&mut self, open_time: i64, bar: &Bar) {
        for s in &mut self.slots {
            s.defined = s.ind.update(bar, &mut s.out);
        }
        self.last = Some(open_time);
    }

    /// The values of the last candle fed, as `indicators` rows (warm-up outputs omitted).
    pub fn rows(&self, out: &mut Vec<IndicatorValue>) {
        let Some(open_time) = self.last else { return };
        for s in self.slots.iter().filter(|s| s.defined) {
            for (output, value) in s.ind.spec().outputs().iter().zip(&s.out) {
                out.push(IndicatorValue {
                    pair: self.pair.clone(),
                    open_time,
                    indicator: s.name.clone(),
                    output,
                    value: *value,
                });
            }
        }
    }

    /// How many values the last candle fed defined.
    pub fn defined_values(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.defined)
            .map(|s| s.out.len() as u64)
            .sum()
    }

    /// The CSV header: `open_time` then one column per output (`rsi(14)`,
    /// `macd(12,26,9).signal`).
    pub fn csv_header(&self) -> String {
        let mut cols = vec!["open_time".to_string()];
        for s in &self.slots {
            let outputs = s.ind.spec().outputs();
            if outputs.len() == 1 {
                cols.push(s.name.to_string());
            } else {
                cols.extend(outputs.iter().map(|o| format!("{}.{o}", s.name)));
            }
        }
        cols.iter()
            .map(|c| csv_field(c))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The CSV line of the last candle fed (warm-up cells empty; values printed in their
    /// shortest exact form, so they parse back to the same f64).
    pub fn csv_line(&self) -> String {
        let mut line = self.last.map(|t| t.to_string()).unwrap_or_default();
        for s in &self.slots {
            for v in &s.out {
                line.push(',');
                if s.defined && !v.is_nan() {
                    line.push_str(&v.to_string());
                }
            }
        }
        line
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Where an offline run's values in `[from, to)` go.
pub enum Output<'a> {
    /// Rows of `indicators`, through the writer.
    Writer(&'a WriterHandle),
    /// A CSV file (header first).
    Csv(&'a mut (dyn Write + Send)),
}

/// What an offline run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfflineSummary {
    /// Closed candles read (the whole series up to `to`).
    pub candles: u64,
    /// Candles in `[from, to)`.
    pub in_range: u64,
    /// Values produced (`indicators` rows, or non-empty CSV cells).
    pub values: u64,
}

/// Computes `specs` over the pair's stored series from its first closed candle (warm-up from
/// the series start), and hands the values of the candles in `[from, to)` to `output`.
/// `progress` is called with the candles read so far.
pub async fn compute_stored(
    store: &Store,
    pair: &PairKey,
    specs: &[Spec],
    (from, to): (i64, i64),
    mut output: Output<'_>,
    progress: &(dyn Fn(u64) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<OfflineSummary, IndicatorError> {
    let mut state = SeriesState::new(pair.clone(), specs);
    let mut summary = OfflineSummary::default();
    if let Output::Csv(w) = &mut output {
        writeln!(w, "{}", state.csv_header())?;
    }
    let mut after = i64::MIN;
    let mut rows = Vec::new();
    let mut done = false;
    while !done {
        if cancel.is_cancelled() {
            return Err(IndicatorError::Cancelled);
        }
        let chunk = store
            .final_klines_after(pair, after, READ_CHUNK)
            .await
            .map_err(|source| IndicatorError::Read {
                pair: pair.clone(),
                source,
            })?;
        let Some(last) = chunk.last() else { break };
        after = last.open_time;
        done = (chunk.len() as u64) < READ_CHUNK;
        for k in &chunk {
            if k.open_time >= to {
                done = true;
                break;
            }
            state.advance(k.open_time, &Bar::from_kline(k));
            summary.candles += 1;
            if k.open_time >= from {
                summary.in_range += 1;
                match &mut output {
                    Output::Writer(_) => state.rows(&mut rows),
                    Output::Csv(w) => {
                        summary.values += state.defined_values();
                        writeln!(w, "{}", state.csv_line())?;
                    }
                }
            }
        }
        if let Output::Writer(handle) = &output {
            summary.values += rows.len() as u64;
            handle
                .send_indicators(std::mem::take(&mut rows))
                .await
                .map_err(|_| IndicatorError::WriterClosed(pair.clone()))?;
        }
        progress(summary.candles);
    }
    if summary.candles == 0 {
        return Err(IndicatorError::NoCandles(pair.clone()));
    }
    if let Output::Csv(w) = &mut output {
        w.flush()?;
    }
    Ok(summary)
}

/// Feeds a stored candle (converted to a [`Bar`] once).
pub fn feed(state: &mut SeriesState, k: &Kline) {
    state.advance(k.open_time, &Bar::from_kline(k));
}
