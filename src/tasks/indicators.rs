//! Indicator computation over a pair's series (its stored closed candles in `open_time` order,
//! from the first one): the per-pair set of incremental states ([`SeriesState`]) that turns each
//! candle into `indicators` rows, and the offline run over the stored history
//! ([`compute_stored`]) behind `quantservice indicators`. The indicators themselves are the pure
//! `qs_core::indicators`.

use std::io::Write;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

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
    /// Candles fed since the series start (counting those before a restored checkpoint).
    bars: u64,
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
            bars: 0,
        }
    }

    /// The state of one indicator restored from a checkpoint: `bars` candles in, the last at
    /// `open_time`.
    pub fn restored(
        pair: PairKey,
        spec: &Spec,
        open_time: i64,
        bars: u64,
        state: &str,
    ) -> Result<SeriesState, api::CheckpointError> {
        let ind = Indicator::restore(spec, state)?;
        Ok(SeriesState {
            pair,
            slots: vec![Slot {
                ind,
                name: Arc::from(spec.to_string()),
                out: vec![f64::NAN; spec.outputs().len()],
                defined: false,
            }],
            last: Some(open_time),
            bars,
        })
    }

    /// Candles fed since the series start.
    pub fn bars(&self) -> u64 {
        self.bars
    }

    /// A durable checkpoint of the first indicator (the state after the last candle fed).
    pub fn checkpoint(&self) -> Option<crate::store::writer::Checkpoint> {
        let slot = self.slots.first()?;
        Some(crate::store::writer::Checkpoint {
            pair: self.pair.clone(),
            indicator: slot.name.clone(),
            open_time: self.last?,
            bars: self.bars,
            state: slot.ind.checkpoint(),
        })
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
        self.bars += 1;
    }

    /// Adds the values of the last candle fed to `rows`, series by series (see
    /// [`SeriesRows`]).
    pub fn collect(&self, rows: &mut SeriesRows) {
        let Some(open_time) = self.last else { return };
        let mut col = 0;
        for s in &self.slots {
            for v in &s.out {
                if s.defined {
                    rows.cols[col].push((open_time, *v));
                }
                col += 1;
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

/// The `indicators` rows of many candles of one [`SeriesState`], kept series by series (one
/// output of one indicator) and handed out in the table's sort key order: by indicator, then
/// output, then `open_time`. ClickHouse skips sorting an insert block that is already in key
/// order, which more than halves its work for an offline run's millions of rows.
#[derive(Debug)]
pub struct SeriesRows {
    pair: PairKey,
    /// Per column (one output of one slot, in slot order): `(open_time, value)`.
    cols: Vec<Vec<(i64, f64)>>,
    /// Per column: its indicator and output.
    keys: Vec<(Arc<str>, &'static str)>,
    /// The columns in key order.
    order: Vec<usize>,
}

impl SeriesRows {
    pub fn new(state: &SeriesState) -> SeriesRows {
        let keys: Vec<(Arc<str>, &'static str)> = state
            .slots
            .iter()
            .flat_map(|s| s.ind.spec().outputs().iter().map(|o| (s.name.clone(), *o)))
            .collect();
        let mut order: Vec<usize> = (0..keys.len()).collect();
        // Bytewise, as ClickHouse compares `String`s.
        order.sort_by(|&a, &b| {
            let (ka, kb) = (&keys[a], &keys[b]);
            (ka.0.as_bytes(), ka.1.as_bytes()).cmp(&(kb.0.as_bytes(), kb.1.as_bytes()))
        });
        SeriesRows {
            pair: state.pair.clone(),
            cols: vec![Vec::new(); keys.len()],
            keys,
            order,
        }
    }

    /// Values collected and not yet taken.
    pub fn len(&self) -> usize {
        self.cols.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The collected values of `indicator` grouped by candle, in `open_time` order, each
    /// candle's outputs in the spec's order (what the client server publishes).
    pub fn events_of(&self, indicator: &str) -> Vec<crate::server::hub::IndicatorEvent> {
        let cols: Vec<(&'static str, &Vec<(i64, f64)>)> = self
            .keys
            .iter()
            .zip(&self.cols)
            .filter(|((name, _), _)| name.as_ref() == indicator)
            .map(|((_, output), col)| (*output, col))
            .collect();
        let mut by_time: std::collections::BTreeMap<i64, Vec<(&'static str, f64)>> =
            std::collections::BTreeMap::new();
        for (output, col) in &cols {
            for &(t, v) in col.iter() {
                by_time.entry(t).or_default().push((output, v));
            }
        }
        by_time
            .into_iter()
            .map(|(open_time, values)| crate::server::hub::IndicatorEvent { open_time, values })
            .collect()
    }

    /// Moves every collected value to `out` as rows, in key order.
    pub fn take(&mut self, out: &mut Vec<IndicatorValue>) {
        out.reserve(self.len());
        for &c in &self.order {
            let (indicator, output) = &self.keys[c];
            for (open_time, value) in self.cols[c].drain(..) {
                out.push(IndicatorValue {
                    pair: self.pair.clone(),
                    open_time,
                    indicator: indicator.clone(),
                    output,
                    value,
                });
            }
        }
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
    let mut rows = Vec::new();
    let mut collected = SeriesRows::new(&state);
    // The next chunk is read while this one is computed and handed on (dropping the handle,
    // on an error or at the end of the range, stops that read).
    let read = |after: i64| {
        let (store, pair) = (store.clone(), pair.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            store.final_klines_after(&pair, after, READ_CHUNK).await
        }))
    };
    let mut next = Some(read(i64::MIN));
    while let Some(reading) = next.take() {
        if cancel.is_cancelled() {
            return Err(IndicatorError::Cancelled);
        }
        let chunk = match reading.await {
            Ok(read) => read,
            Err(e) => Err(StoreError::Protocol(format!(
                "the chunk reader failed: {e}"
            ))),
        }
        .map_err(|source| IndicatorError::Read {
            pair: pair.clone(),
            source,
        })?;
        match chunk.last() {
            Some(last) if chunk.len() as u64 == READ_CHUNK && last.open_time < to => {
                next = Some(read(last.open_time));
            }
            _ => {}
        }
        for k in chunk.iter().take_while(|k| k.open_time < to) {
            state.advance(k.open_time, &Bar::from_kline(k));
            summary.candles += 1;
            if k.open_time >= from {
                summary.in_range += 1;
                match &mut output {
                    Output::Writer(_) => state.collect(&mut collected),
                    Output::Csv(w) => {
                        summary.values += state.defined_values();
                        writeln!(w, "{}", state.csv_line())?;
                    }
                }
            }
        }
        if let Output::Writer(handle) = &output {
            collected.take(&mut rows);
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

/// Durable checkpoints are written every this many candles of a computation, and at its end.
pub const CHECKPOINT_EVERY: u64 = 10_000;
/// How often, at most, a live indicator's `indicator_status` row is rewritten.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How far back a late candle's recomputation looks for a checkpoint that still matches the
/// stored series before starting from the series start.
const MAX_CHECKPOINT_TRIES: usize = 16;

/// Phases of `indicator_status`.
pub mod phase {
    /// Computing the stored history (a new indicator, or after a late candle).
    pub const COMPUTING: &str = "computing";
    /// Up to date with the stored series; advanced by each closed candle written.
    pub const LIVE: &str = "live";
    pub const ERROR: &str = "error";
}

/// The daemon's task for one indicator of one pair: computes it over the stored history (from
/// a checkpoint that still matches the stored series, else from the series start), then keeps
/// it up to date as the writer commits closed candles of the pair; a candle committed before
/// the newest computed one that changed the series (a healed hole, a late final) makes it
/// recompute from a checkpoint before that candle and rewrite every later value.
pub struct IndicatorTask {
    pub pair: PairKey,
    pub spec: Spec,
    pub store: Store,
    pub writer: WriterHandle,
    /// Durable checkpoint interval in candles ([`CHECKPOINT_EVERY`]).
    pub checkpoint_every: u64,
    /// The client server's hub: values are published before they are queued for the writer.
    pub hub: Option<crate::server::hub::Hub>,
}

impl IndicatorTask {
    pub fn new(pair: PairKey, spec: Spec, store: Store, writer: WriterHandle) -> IndicatorTask {
        IndicatorTask {
            pair,
            spec,
            store,
            writer,
            checkpoint_every: CHECKPOINT_EVERY,
            hub: None,
        }
    }

    /// Publishes the values to `hub` too.
    pub fn with_hub(mut self, hub: Option<crate::server::hub::Hub>) -> IndicatorTask {
        self.hub = hub;
        self
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<(), crate::tasks::TaskError> {
        let name = self.spec.to_string();
        let result = self.run_inner(&name, &cancel).await;
        if let Err(e) = &result {
            if !matches!(e, IndicatorError::Cancelled) {
                let _ = self
                    .store
                    .write_indicator_status(&self.pair, &name, phase::ERROR, 0, &e.to_string())
                    .await;
            }
        }
        match result {
            Ok(()) | Err(IndicatorError::Cancelled) => Ok(()),
            Err(e) => Err(crate::tasks::TaskError::Retryable(format!(
                "indicator {name}: {e}"
            ))),
        }
    }

    async fn run_inner(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<(), IndicatorError> {
        // Subscribed before the first read: nothing committed meanwhile is missed.
        let commits = self.writer.commits().subscribe(&self.pair);
        let mut state = self.resume(i64::MAX).await?;
        let resumed_at = state.last_open_time();
        tracing::info!(pair = %self.pair, indicator = name, resumed_at = ?resumed_at,
            bars = state.bars(), "Indicator computing the stored history.");
        self.status(phase::COMPUTING, &state).await;
        let mut written_phase = phase::COMPUTING;
        let mut written_at = tokio::time::Instant::now();
        // The newest computed candle not yet in `indicator_status`.
        let mut unwritten: Option<i64> = None;
        // The newest candle computed so far: values up to it that are computed again (after a
        // late candle) are corrections for the client server.
        let mut high_water: Option<i64> = None;
        let mut corrected_upto: Option<i64> = None;
        loop {
            self.catch_up(&mut state, corrected_upto, cancel).await?;
            high_water = high_water.max(state.last_open_time());
            corrected_upto = None;
            // While live, the status follows at most every STATUS_INTERVAL (one small insert per
            // flush and indicator would be too many); a phase change is written at once.
            if written_phase != phase::LIVE || written_at.elapsed() >= STATUS_INTERVAL {
                self.status(phase::LIVE, &state).await;
                written_phase = phase::LIVE;
                written_at = tokio::time::Instant::now();
                unwritten = None;
            } else if state.last_open_time().is_some() {
                unwritten = state.last_open_time();
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = commits.changed() => {}
                _ = tokio::time::sleep_until(written_at + STATUS_INTERVAL), if unwritten.is_some() => {
                    self.status(phase::LIVE, &state).await;
                    written_at = tokio::time::Instant::now();
                    unwritten = None;
                    continue;
                }
            }
            let Some(earliest) = commits.take() else {
                continue;
            };
            if let Some(last) = state.last_open_time() {
                if earliest <= last && self.series_changed_before(&state, last).await? {
                    tracing::info!(pair = %self.pair, indicator = name, late = earliest, last,
                        "A candle arrived before the newest computed value; recomputing from a checkpoint before it.");
                    state = self.resume(earliest).await?;
                    corrected_upto = high_water;
                    self.status(phase::COMPUTING, &state).await;
                    written_phase = phase::COMPUTING;
                }
            }
        }
        if unwritten.is_some() {
            self.status(phase::LIVE, &state).await;
        }
        // A last checkpoint, so a restart resumes from here.
        if let Some(cp) = state.checkpoint() {
            let _ = self.writer.send_checkpoint(cp).await;
        }
        Err(IndicatorError::Cancelled)
    }

    /// Whether the stored series up to `last` is no longer the one `state` was computed over
    /// (a candle was inserted before `last`).
    async fn series_changed_before(
        &self,
        state: &SeriesState,
        last: i64,
    ) -> Result<bool, IndicatorError> {
        let n = self
            .store
            .count_final_klines_upto(&self.pair, last)
            .await
            .map_err(|source| self.read_error(source))?;
        Ok(n != state.bars())
    }

    /// The state from the newest stored checkpoint before `before` that still matches the
    /// stored series (as many candles stored up to it as it had seen), else a fresh one.
    async fn resume(&self, before: i64) -> Result<SeriesState, IndicatorError> {
        let name = self.spec.to_string();
        let mut before = before;
        for _ in 0..MAX_CHECKPOINT_TRIES {
            let Some(cp) = self
                .store
                .checkpoint_before(&self.pair, &name, before)
                .await
                .map_err(|source| self.read_error(source))?
            else {
                break;
            };
            let stored = self
                .store
                .count_final_klines_upto(&self.pair, cp.open_time)
                .await
                .map_err(|source| self.read_error(source))?;
            if stored == cp.bars {
                match SeriesState::restored(
                    self.pair.clone(),
                    &self.spec,
                    cp.open_time,
                    cp.bars,
                    &cp.state,
                ) {
                    Ok(s) => return Ok(s),
                    Err(e) => tracing::warn!(pair = %self.pair, indicator = %name, error = %e,
                        "Unusable checkpoint; trying an older one."),
                }
            }
            before = cp.open_time;
        }
        Ok(SeriesState::new(
            self.pair.clone(),
            std::slice::from_ref(&self.spec),
        ))
    }

    /// Feeds every stored closed candle after the state's last one, sending the values (and a
    /// checkpoint every `checkpoint_every` candles and at the end) to the writer.
    async fn catch_up(
        &self,
        state: &mut SeriesState,
        corrected_upto: Option<i64>,
        cancel: &CancellationToken,
    ) -> Result<(), IndicatorError> {
        let name = self.spec.to_string();
        let every = self.checkpoint_every.max(1);
        let mut fed = 0u64;
        loop {
            if cancel.is_cancelled() {
                return Err(IndicatorError::Cancelled);
            }
            let after = state.last_open_time().unwrap_or(i64::MIN);
            let chunk = self
                .store
                .final_klines_after(&self.pair, after, READ_CHUNK)
                .await
                .map_err(|source| self.read_error(source))?;
            let mut collected = SeriesRows::new(state);
            let mut checkpoints = Vec::new();
            for k in &chunk {
                feed(state, k);
                state.collect(&mut collected);
                fed += 1;
                if state.bars() % every == 0 {
                    checkpoints.extend(state.checkpoint());
                }
            }
            if (chunk.len() as u64) < READ_CHUNK && fed > 0 && state.bars() % every != 0 {
                checkpoints.extend(state.checkpoint());
            }
            if let Some(hub) = self.hub.as_ref().filter(|h| h.is_active()) {
                let events = collected.events_of(&name);
                hub.publish_indicators(&self.pair, &self.spec, &events, corrected_upto, false);
            }
            let mut rows = Vec::new();
            collected.take(&mut rows);
            if !rows.is_empty() {
                self.writer
                    .send_indicators(rows)
                    .await
                    .map_err(|_| IndicatorError::WriterClosed(self.pair.clone()))?;
            }
            for cp in checkpoints {
                self.writer
                    .send_checkpoint(cp)
                    .await
                    .map_err(|_| IndicatorError::WriterClosed(self.pair.clone()))?;
            }
            if (chunk.len() as u64) < READ_CHUNK {
                return Ok(());
            }
        }
    }

    fn read_error(&self, source: StoreError) -> IndicatorError {
        IndicatorError::Read {
            pair: self.pair.clone(),
            source,
        }
    }

    /// Writes the observed state; a failure is logged (the next change writes it again).
    async fn status(&self, phase: &str, state: &SeriesState) {
        let name = self.spec.to_string();
        if let Err(e) = self
            .store
            .write_indicator_status(
                &self.pair,
                &name,
                phase,
                state.last_open_time().unwrap_or(0),
                "",
            )
            .await
        {
            tracing::warn!(pair = %self.pair, indicator = %name, error = %e,
                "Cannot write indicator_status.");
        }
    }
}
