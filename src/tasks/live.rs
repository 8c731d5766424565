//! The live side of every streamed pair: takes closed candles from the WebSocket streams,
//! drops repeats (a renewed socket overlaps the old one), queues them for the writer and keeps
//! `pair_status` (last closed candle, lag, reconnects) current. It also heals the stream: after
//! a reconnect, and whenever a closed candle has not arrived `late_grace` after its close, the
//! missing window since the last closed candle is fetched by REST. Opening sockets is not here
//! (`exchange::ws`), nor is history (the pair task).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::exchange::rest::RestClient;
use crate::exchange::ws::LiveEvent;
use crate::market::{now_ms, PairKey, Period};
use crate::status::{phase, StatusHub};
use crate::store::writer::WriterHandle;
use crate::tasks::backfill::Backfill;
use crate::tasks::TaskError;

/// Closed candles remembered per pair to drop repeats.
const RECENT: usize = 32;
/// REST catch-ups running at once (they share the weight governor with everything else).
const CATCH_UP_CONCURRENCY: usize = 4;

#[derive(Debug, Default)]
struct PairLive {
    /// Open time of the newest closed candle we have (received, or fetched by a catch-up).
    last_final: i64,
    /// Open time of the newest closed candle the stream itself delivered (or, until one
    /// arrives, the newest closed one when the pair was added): how far behind the stream is.
    last_ws_final: i64,
    /// Shown as `stream_down` in `pair_status`.
    down: bool,
    recent: VecDeque<i64>,
    catching_up: bool,
    /// Failed catch-ups back off (jittered, doubling) so an outage does not hammer the budget.
    failures: u32,
    next_try: Option<tokio::time::Instant>,
}

/// First and longest delay between failed catch-ups of one pair.
const CATCH_UP_BACKOFF: Duration = Duration::from_secs(1);
const CATCH_UP_MAX_BACKOFF: Duration = Duration::from_secs(120);

/// The live sink's inputs. Cloned for each run: the supervisor restarts it after a failure,
/// and the event queue (behind a lock that a panicking run releases) outlives the run.
#[derive(Clone)]
pub struct Live {
    pub events: Arc<tokio::sync::Mutex<mpsc::Receiver<LiveEvent>>>,
    /// The pairs that are streamed (set by the reconcile pass).
    pub streamed: watch::Receiver<BTreeSet<PairKey>>,
    pub writer: WriterHandle,
    pub backfill: Arc<Backfill>,
    pub rest: Arc<RestClient>,
    pub status: StatusHub,
    pub late_grace: Duration,
    /// The client server's hub: each new closed candle is published before it is queued for
    /// the writer (clients get it before or while it is stored).
    pub hub: Option<crate::server::hub::Hub>,
    /// Set by the first run: a later run (after a failure) resumes every pair from its last
    /// closed candle in `pair_status`, so what the failed run dropped is fetched by REST.
    pub resumed: Arc<AtomicBool>,
}

impl Live {
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), TaskError> {
        let restarted = self.resumed.swap(true, Ordering::SeqCst);
        let events = self.events.clone();
        let mut events = events.lock().await;
        let mut pairs: HashMap<PairKey, PairLive> = HashMap::new();
        let mut jobs: JoinSet<(i64, Result<(), String>)> = JoinSet::new();
        let mut job_pairs: HashMap<tokio::task::Id, PairKey> = HashMap::new();
        let mut queue: VecDeque<(PairKey, i64)> = VecDeque::new();
        let mut check = crate::ticker(Duration::from_millis(500));
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    jobs.shutdown().await;
                    // Closed candles already queued go to the writer, not to waste: the
                    // owner stops the sockets first and the writer after this.
                    let mut drained = 0u64;
                    while let Ok(ev) = events.try_recv() {
                        let LiveEvent::Final { kline, .. } = ev else { continue };
                        let fresh = pairs
                            .get(&kline.pair)
                            .is_some_and(|p| !p.recent.contains(&kline.open_time));
                        if fresh {
                            if let Some(hub) = &self.hub {
                                hub.publish_kline(&kline);
                            }
                            if self.writer.send(kline).await.is_err() {
                                break;
                            }
                            drained += 1;
                        }
                    }
                    if drained > 0 {
                        debug!(drained, "Queued closed candles handed to the writer.");
                    }
                    return Ok(());
                }
                ev = events.recv() => {
                    let Some(ev) = ev else {
                        return Err(TaskError::Retryable("the stream managers are gone".into()));
                    };
                    crate::faults::hit("live_sink");
                    match ev {
                        LiveEvent::Final { kline, event_ms } => {
                            let received = now_ms();
                            if !pairs.contains_key(&kline.pair) {
                                // Just added (the set changed since the last check), or no
                                // longer streamed (an UNSUBSCRIBE in flight).
                                self.sync_pairs(&mut pairs, restarted);
                            }
                            let Some(p) = pairs.get_mut(&kline.pair) else {
                                continue;
                            };
                            if p.recent.contains(&kline.open_time) {
                                continue;
                            }
                            p.recent.push_back(kline.open_time);
                            if p.recent.len() > RECENT {
                                p.recent.pop_front();
                            }
                            p.last_final = p.last_final.max(kline.open_time);
                            p.last_ws_final = p.last_ws_final.max(kline.open_time);
                            p.down = false;
                            crate::metrics::add(&crate::metrics::WS_FINALS, 1);
                            let (pair, open, close) = (kline.pair.clone(), kline.open_time, kline.close_time);
                            if let Some(hub) = &self.hub {
                                hub.publish_kline(&kline);
                            }
                            if self.writer.send(kline).await.is_err() {
                                return Err(TaskError::Retryable("the writer stopped".into()));
                            }
                            let lag = received - close;
                            debug!(%pair, open, lag, event_ms, "Closed candle received.");
                            self.status.update(&pair, |r| {
                                r.last_closed_open_time = r.last_closed_open_time.max(open);
                                r.lag_ms = lag;
                                // Whoever marked it down (this run, or one before a restart).
                                if r.phase == phase::STREAM_DOWN {
                                    r.phase = phase::STREAMING.into();
                                }
                            });
                        }
                        LiveEvent::Connected { pairs: conn_pairs, reconnect, .. } => {
                            if reconnect {
                                crate::metrics::add(&crate::metrics::WS_RECONNECTS, 1);
                                for pair in &conn_pairs {
                                    self.status.update(pair, |r| r.reconnects += 1);
                                    if let Some(p) = pairs.get(pair) {
                                        let from = pair.period.next_open(p.last_final);
                                        if !p.catching_up {
                                            queue.push_back((pair.clone(), from));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                done = jobs.join_next_with_id(), if !jobs.is_empty() => {
                    let (id, outcome) = match done {
                        Some(Ok((id, (upto, result)))) => (id, Some((upto, result))),
                        // A panicked job is a failed one (counted); its pair must not stay
                        // "catching up".
                        Some(Err(e)) => {
                            crate::metrics::add(&crate::metrics::TASK_FAILURES, 1);
                            let id = e.id();
                            let text = crate::join_error_text(e);
                            (id, Some((0, Err(format!("catch-up: {text}")))))
                        }
                        None => continue,
                    };
                    let Some(pair) = job_pairs.remove(&id) else { continue };
                    if let Some(p) = pairs.get_mut(&pair) {
                        p.catching_up = false;
                        match outcome {
                            Some((upto, Ok(()))) => {
                                p.last_final = p.last_final.max(upto);
                                p.failures = 0;
                                p.next_try = None;
                            }
                            failed => {
                                let e = match failed {
                                    Some((_, Err(e))) => e,
                                    _ => "the catch-up task ended unexpectedly".to_string(),
                                };
                                let delay = crate::backoff::delay(
                                    p.failures,
                                    CATCH_UP_BACKOFF,
                                    CATCH_UP_MAX_BACKOFF,
                                    &mut rand::rng(),
                                );
                                p.failures = p.failures.saturating_add(1);
                                p.next_try = Some(tokio::time::Instant::now() + delay);
                                warn!(%pair, error = %e, retry_in = ?delay, "Stream catch-up failed; retrying later.");
                                self.status.update(&pair, |r| r.last_error = e.clone());
                            }
                        }
                    }
                }
                changed = self.streamed.changed() => {
                    if changed.is_err() {
                        // The operator is gone; stop with it.
                        cancel.cancelled().await;
                    }
                    self.sync_pairs(&mut pairs, restarted);
                }
                _ = check.tick() => {
                    self.sync_pairs(&mut pairs, restarted);
                    self.find_late(&pairs, &mut queue);
                    self.report_stream_health(&mut pairs);
                }
            }
            // Start queued catch-ups.
            while jobs.len() < CATCH_UP_CONCURRENCY {
                let Some((pair, from)) = queue.pop_front() else {
                    break;
                };
                let Some(p) = pairs.get_mut(&pair) else {
                    continue;
                };
                if p.catching_up || p.next_try.is_some_and(|t| tokio::time::Instant::now() < t) {
                    continue;
                }
                p.catching_up = true;
                let now = self.rest.server_now(pair.market);
                let to = pair.period.align(now);
                if from >= to {
                    p.catching_up = false;
                    continue;
                }
                let upto = pair.period.align(to - 1);
                let backfill = self.backfill.clone();
                let cancel = cancel.child_token();
                info!(%pair, from, to, "Fetching candles the stream missed by REST.");
                let key = pair.clone();
                let handle = jobs.spawn(async move {
                    crate::faults::hit("catch_up");
                    let r = backfill
                        .run(&pair, from, to, &ProgressBar::hidden(), &cancel)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    (upto, r)
                });
                job_pairs.insert(handle.id(), key);
            }
        }
    }

    /// Follows the streamed set: new pairs start from the last closed candle as of now (older
    /// ones are the backfill's), removed ones are forgotten. After a restart (`resume`), a pair
    /// starts from the last closed candle it had received, so the late check fetches the rest.
    fn sync_pairs(&mut self, pairs: &mut HashMap<PairKey, PairLive>, resume: bool) {
        let wanted = self.streamed.borrow_and_update().clone();
        pairs.retain(|k, _| wanted.contains(k));
        for k in wanted {
            pairs.entry(k).or_insert_with_key(|k| {
                let now = self.rest.server_now(k.market);
                let newest = k.period.align(k.period.align(now) - 1);
                let received = if resume {
                    self.status.get(k).map_or(0, |r| r.last_closed_open_time)
                } else {
                    0
                };
                let last_final = if received > 0 {
                    received.min(newest)
                } else {
                    newest
                };
                PairLive {
                    last_final,
                    last_ws_final: last_final,
                    ..PairLive::default()
                }
            });
        }
    }

    /// Observed state tells the truth about the stream: a pair whose newest closed candle has
    /// not come from the WebSocket `late_grace` after its close is `stream_down` (whatever
    /// REST fills in meanwhile), with `lag_ms` growing from its last streamed candle's close;
    /// the next streamed candle makes it `streaming` again. Phases owned by others
    /// (backfilling, healing, error) are left alone.
    fn report_stream_health(&self, pairs: &mut HashMap<PairKey, PairLive>) {
        let grace = i64::try_from(self.late_grace.as_millis()).unwrap_or(i64::MAX);
        for (pair, p) in pairs.iter_mut() {
            let now = self.rest.server_now(pair.market);
            if p.last_ws_final >= overdue(pair.period, now, grace) {
                continue;
            }
            let lag = now - pair.period.close_time(p.last_ws_final);
            let first = !std::mem::replace(&mut p.down, true);
            if first {
                let last = qs_core::time::UnixMs(p.last_ws_final);
                warn!(%pair, lag_ms = lag, last_streamed_open = %last,
                    "Closed candles stopped arriving on the stream.");
            }
            self.status.update(pair, |r| {
                if r.phase == phase::STREAMING || r.phase == phase::STREAM_DOWN {
                    r.phase = phase::STREAM_DOWN.into();
                    r.lag_ms = lag;
                }
            });
        }
    }

    /// Pairs whose newest closed candle is overdue by more than the grace period.
    fn find_late(&self, pairs: &HashMap<PairKey, PairLive>, queue: &mut VecDeque<(PairKey, i64)>) {
        let grace = i64::try_from(self.late_grace.as_millis()).unwrap_or(i64::MAX);
        for (pair, p) in pairs {
            if p.catching_up
                || p.next_try.is_some_and(|t| tokio::time::Instant::now() < t)
                || queue.iter().any(|(q, _)| q == pair)
            {
                continue;
            }
            let now = self.rest.server_now(pair.market);
            if p.last_final < overdue(pair.period, now, grace) {
                queue.push_back((pair.clone(), pair.period.next_open(p.last_final)));
            }
        }
    }
}

/// The open time of the newest candle that closed more than `grace` before `now`: the stream
/// should have delivered it. (Not simply the newest closed candle: with a grace longer than
/// the period — 1s candles — that one is never overdue, and nothing would ever be.)
fn overdue(period: Period, now: i64, grace: i64) -> i64 {
    period.align(period.align(now.saturating_sub(grace)) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overdue_candle_from_tables() {
        struct Case {
            name: &'static str,
            period: Period,
            now: i64,
            grace: i64,
            expected: i64,
        }
        let cases = [
            Case {
                name: "1s candles, 1 s grace: the one that closed over a second ago",
                period: Period::S1,
                now: 10_500,
                grace: 1_000,
                expected: 8_000,
            },
            Case {
                name: "1s candles, 5 s grace",
                period: Period::S1,
                now: 10_000,
                grace: 5_000,
                expected: 4_000,
            },
            Case {
                name: "1m candles, 2 s grace, just after a close: the previous one",
                period: Period::M1,
                now: 120_500,
                grace: 2_000,
                expected: 0,
            },
            Case {
                name: "1m candles, 2 s grace, past the grace: the one that just closed",
                period: Period::M1,
                now: 122_001,
                grace: 2_000,
                expected: 60_000,
            },
        ];
        for c in cases {
            assert_eq!(overdue(c.period, c.now, c.grace), c.expected, "{}", c.name);
            // It closed more than `grace` ago, and the next one did not.
            assert!(
                c.period.close_time(c.expected) < c.now - c.grace,
                "{}",
                c.name
            );
            let next = c.period.next_open(c.expected);
            assert!(c.period.close_time(next) >= c.now - c.grace, "{}", c.name);
        }
    }
}
