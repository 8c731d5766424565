//! One pair's history: backfill it from `backfill_from` (0 = the listing) while the live stream
//! already runs, then keep it complete with scheduled gap scans. Scans are incremental: they
//! start at a verified watermark (everything before it is stored or an exchange-confirmed gap)
//! and look only at candles closed at least `gap_scan.grace` ago, which the stream should have
//! delivered. Missing candles go to the backfill engine; confirmed gaps are never fetched again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::ProgressBar;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::exchange::rest::RestClient;
use crate::market::{now_ms, PairKey};
use crate::status::{phase, StatusHub};
use crate::store::Store;
use crate::tasks::backfill::{missing_candles, Backfill, BackfillError};
use crate::tasks::TaskError;

/// What the user declared for one pair (a `trading_pairs` row): the spec of its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairSpec {
    /// Backfill from this open time (ms); 0 means from the listing.
    pub backfill_from: i64,
    /// Whether the pair is streamed live (`stream = 1`, the default).
    pub stream: bool,
}

pub struct PairTask {
    pub pair: PairKey,
    pub spec: PairSpec,
    pub backfill: Arc<Backfill>,
    pub rest: Arc<RestClient>,
    pub store: Store,
    pub status: StatusHub,
    /// Ticks of this pair's period from the gap-scan scheduler.
    pub ticks: broadcast::Receiver<()>,
    /// `app.gap_scan.grace` in ms (changes live).
    pub grace: Arc<AtomicU64>,
    /// Bounds the initial backfills running at once (each holds a chunk's bookkeeping and a
    /// few pages; a thousand pairs declared at once must not hold a thousand).
    pub backfill_slots: Arc<tokio::sync::Semaphore>,
}

/// How far behind the initial backfill's end the first gap scan starts.
const WATERMARK_OVERLAP_MS: i64 = 3_600_000;

/// Initial pair backfills running at once (they share the weight budget anyway).
pub const PARALLEL_BACKFILLS: usize = 8;

impl PairTask {
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), TaskError> {
        let pair = self.pair.clone();
        let live = self.spec.stream;
        self.status.update(&pair, |r| {
            r.phase = phase::BACKFILLING.into();
            r.last_error.clear();
        });
        let start = self.spec.backfill_from.max(0);
        let end =
            (now_ms() + pair.period.fixed_ms().unwrap_or(crate::market::DAY_MS)).max(start + 1);
        let slot = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            s = self.backfill_slots.clone().acquire_owned() => s.ok(),
        };
        let summary = match self
            .backfill
            .run(&pair, start, end, &ProgressBar::hidden(), &cancel)
            .await
        {
            Ok(s) => s,
            Err(BackfillError::Cancelled) => return Ok(()),
            Err(e) => return Err(TaskError::from(e).context("backfill failed")),
        };
        drop(slot);
        let mut watermark = match summary.range {
            Some((lo, hi)) => {
                self.status.update(&pair, |r| {
                    r.backfilled_from = lo;
                    r.backfilled_to = hi;
                });
                // The backfill leaves its newest candles unresolved when Binance does not
                // serve them yet (its lag): the scans re-check the last hour of it.
                lo.max(pair.period.align(hi - WATERMARK_OVERLAP_MS))
            }
            // Nothing to backfill yet (a future `backfill_from`, or no candle yet): scans
            // start at the later of the two.
            None => pair
                .period
                .align(start.max(self.rest.server_now(pair.market))),
        };
        info!(%pair, rows_rest = summary.rows_rest, rows_archive = summary.rows_archive,
            present = summary.present, "Backfill done; gap scans take over.");
        let steady = if live { phase::STREAMING } else { phase::IDLE };
        self.status.update(&pair, |r| {
            r.phase = steady.into();
            r.last_error.clear();
        });
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                t = self.ticks.recv() => {
                    if let Err(broadcast::error::RecvError::Closed) = t {
                        // The scheduler is being rebuilt; the task is restarted with it.
                        cancel.cancelled().await;
                        return Ok(());
                    }
                }
            }
            crate::faults::hit("pair_task");
            let scanned = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                r = self.scan(watermark, steady, &cancel) => r,
            };
            watermark = match scanned {
                Ok(w) => w,
                Err(BackfillError::Cancelled) => return Ok(()),
                Err(e) => return Err(TaskError::from(e).context("gap healing failed")),
            };
        }
    }

    /// One scan from `watermark`; returns the new watermark.
    async fn scan(
        &self,
        watermark: i64,
        steady: &str,
        cancel: &CancellationToken,
    ) -> Result<i64, BackfillError> {
        let pair = &self.pair;
        let now = self.rest.server_now(pair.market);
        let grace = i64::try_from(self.grace.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        // Candles whose close is at least `grace` old: open < align(now - grace) - period + 1.
        let horizon = pair.period.align(now.saturating_sub(grace));
        let horizon = if pair.period.close_time(horizon) < now - grace {
            pair.period.next_open(horizon)
        } else {
            horizon
        };
        if watermark >= horizon {
            return Ok(watermark);
        }
        let missing = missing_candles(&self.store, pair, watermark, horizon).await?;
        if missing.is_empty() {
            self.status.update(pair, |r| r.open_gaps = 0);
            return Ok(horizon);
        }
        let first = missing[0];
        let last = missing[missing.len() - 1];
        info!(%pair, missing = missing.len(), first, last, "Gap scan found missing candles; healing.");
        self.status.update(pair, |r| {
            // A stream that is down stays reported as such while REST heals behind it.
            if r.phase != phase::STREAM_DOWN {
                r.phase = phase::HEALING.into();
            }
            r.open_gaps = missing.len() as u64;
        });
        self.backfill
            .run(
                pair,
                first,
                pair.period.next_open(last),
                &ProgressBar::hidden(),
                cancel,
            )
            .await?;
        let still = missing_candles(&self.store, pair, watermark, horizon).await?;
        debug!(%pair, still = still.len(), "Gap scan done.");
        self.status.update(pair, |r| {
            if r.phase == phase::HEALING {
                r.phase = steady.into();
            }
            r.open_gaps = still.len() as u64;
        });
        // Everything before the first candle still missing is verified.
        Ok(still.first().copied().unwrap_or(horizon))
    }
}
