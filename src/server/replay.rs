//! A subscription's replay (`since`): the stored rows from `since` on, read from ClickHouse in
//! `open_time` order and queued for the connection, then the live frames that arrived
//! meanwhile, then live delivery, with nothing lost or sent twice at the seam.
//!
//! How the seam works: the subscription is registered with the hub *before* the first read,
//! into a staging queue (with the hub's recent frames from `since`, which may not be stored
//! yet). After the last stored row, the staging queue is drained: a frame whose `open_time`
//! the replay already delivered, or one before `since`, is dropped (unless it is an indicator
//! correction of a delivered one), a new one is queued. With a standalone server's follower,
//! the drain waits for one of its looks that started after the last read, so that a row the
//! replay read cannot come back later as a live one. The hub then moves the subscription to the connection's queue, but only at a
//! moment when the staging queue is empty, under the lock every publisher takes: no frame can
//! slip in between.

use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::hub::{Frame, Hub, Retarget, SubId, Target};
use super::protocol::{self, Channel};
use crate::market::Period;
use crate::store::{Store, StoreError};

/// Candles (or indicator candles) read from ClickHouse per query.
pub const CHUNK: u64 = 20_000;

/// Live frames a replaying subscription may hold in its staging queue; more and the connection
/// is closed as a slow consumer (it would take a client far behind the live edge).
pub const STAGING: usize = 8192;

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the stored rows failed: {0}")]
    Store(#[from] StoreError),
    /// The connection went away.
    #[error("the connection closed")]
    Closed,
}

/// The `open_time`s a replay delivered, as runs of consecutive candles (a handful for a
/// complete series, however long).
#[derive(Debug, Clone)]
pub struct Delivered {
    period: Period,
    runs: Vec<(i64, i64)>,
}

impl Delivered {
    pub fn new(period: Period) -> Delivered {
        Delivered {
            period,
            runs: Vec::new(),
        }
    }

    /// Records `t`, later than every `open_time` recorded so far.
    pub fn push(&mut self, t: i64) {
        if let Some(last) = self.runs.last_mut() {
            if self.period.next_open(last.1) == t {
                last.1 = t;
                return;
            }
        }
        self.runs.push((t, t));
    }

    pub fn contains(&self, t: i64) -> bool {
        let i = self.runs.partition_point(|&(start, _)| start <= t);
        i > 0 && t <= self.runs[i - 1].1
    }

    pub fn last(&self) -> Option<i64> {
        self.runs.last().map(|r| r.1)
    }

    /// Whether a live frame that waited during the replay still has to be sent.
    pub fn wants(&self, f: &Frame) -> bool {
        if !f.is_final {
            // An in-progress candle: only one after everything replayed.
            return self.last().is_none_or(|l| f.open_time > l);
        }
        f.correction || !self.contains(f.open_time)
    }
}

/// A running replay.
pub struct Replay {
    pub channel: Channel,
    pub id: SubId,
    staging: mpsc::Receiver<Frame>,
}

impl Replay {
    /// Registers the subscription with the hub (into a staging queue, with the recent frames
    /// from `since`); [`run`](Self::run) does the rest. The staging queue shares the
    /// connection's slow-consumer signal.
    pub fn start(hub: &Hub, channel: Channel, partial: bool, since: i64, conn: &Target) -> Replay {
        let (queue, staging) = mpsc::channel(STAGING);
        let target = Target {
            queue,
            slow: conn.slow.clone(),
        };
        let id = hub.subscribe_since(channel.clone(), partial, target, Some(since));
        Replay {
            channel,
            id,
            staging,
        }
    }

    /// Queues the stored rows from `since`, then the staged live frames, then hands the
    /// subscription over to `conn`. The number of frames queued.
    pub async fn run(
        mut self,
        store: Store,
        hub: Hub,
        since: i64,
        conn: Target,
    ) -> Result<u64, ReplayError> {
        let mut delivered = Delivered::new(self.channel.pair().period);
        // A reader fetches the next chunk while this renders and queues the current one.
        let (chunks, mut rx) = mpsc::channel::<Result<Rows, StoreError>>(2);
        let reader = AbortOnDropHandle::new(tokio::spawn(read(
            store,
            self.channel.clone(),
            since,
            chunks,
        )));
        let name = match &self.channel {
            Channel::Indicator(_, spec) => spec.to_string(),
            Channel::Klines(_) => String::new(),
        };
        let mut sent = 0u64;
        while let Some(chunk) = rx.recv().await {
            let frames: Vec<Frame> = match chunk? {
                Rows::Klines(rows) => rows
                    .iter()
                    .map(|k| Frame {
                        text: protocol::kline(k).into(),
                        open_time: k.open_time,
                        is_final: true,
                        correction: false,
                    })
                    .collect(),
                Rows::Values(events) => {
                    let pair = self.channel.pair();
                    events
                        .iter()
                        .map(|e| Frame {
                            text: protocol::indicator(pair, &name, e.open_time, &e.values, false)
                                .into(),
                            open_time: e.open_time,
                            is_final: true,
                            correction: false,
                        })
                        .collect()
                }
            };
            for f in frames {
                delivered.push(f.open_time);
                conn.queue.send(f).await.map_err(|_| ReplayError::Closed)?;
                sent += 1;
            }
        }
        drop(reader);
        // A standalone server's follower publishes what became visible up to now first.
        hub.fresh_look().await;
        loop {
            while let Ok(f) = self.staging.try_recv() {
                if f.open_time >= since && delivered.wants(&f) {
                    conn.queue.send(f).await.map_err(|_| ReplayError::Closed)?;
                    sent += 1;
                }
            }
            match hub.retarget_when_drained(
                &self.channel,
                self.id,
                &conn,
                &self.staging,
                &delivered,
            ) {
                Retarget::Moved | Retarget::Gone => return Ok(sent),
                Retarget::Pending => continue,
            }
        }
    }
}

/// One chunk of stored rows.
enum Rows {
    Klines(Vec<crate::market::Kline>),
    Values(Vec<crate::store::replay::IndicatorEvent>),
}

/// Reads the channel's stored rows from `since` chunk by chunk into `out`.
async fn read(
    store: Store,
    channel: Channel,
    since: i64,
    out: mpsc::Sender<Result<Rows, StoreError>>,
) {
    let mut after = since.saturating_sub(1);
    loop {
        let chunk = match &channel {
            Channel::Klines(pair) => {
                store
                    .final_klines_after(pair, after, CHUNK)
                    .await
                    .map(|rows| {
                        let last = rows.last().map(|k| k.open_time);
                        (last, rows.len(), Rows::Klines(rows))
                    })
            }
            Channel::Indicator(pair, spec) => store
                .indicator_events_after(pair, spec, after, CHUNK)
                .await
                .map(|events| {
                    let last = events.last().map(|e| e.open_time);
                    (last, events.len(), Rows::Values(events))
                }),
        };
        let (last, done, chunk) = match chunk {
            Ok((last, n, rows)) => (last, (n as u64) < CHUNK, Ok(rows)),
            Err(e) => (None, true, Err(e)),
        };
        if out.send(chunk).await.is_err() || done {
            return;
        }
        match last {
            Some(t) => after = t,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(t: i64, is_final: bool, correction: bool) -> Frame {
        Frame {
            text: "".into(),
            open_time: t,
            is_final,
            correction,
        }
    }

    #[test]
    fn delivered_runs_answer_the_seam() {
        let m = 60_000;
        let mut d = Delivered::new(Period::M1);
        assert!(d.wants(&frame(0, true, false)), "nothing replayed yet");
        for i in (0..100).chain(150..200).chain([500]) {
            d.push(i * m);
        }
        assert_eq!(d.runs.len(), 3);
        assert_eq!(d.last(), Some(500 * m));
        for i in (0..100).chain(150..200).chain([500]) {
            assert!(d.contains(i * m), "{i}");
            assert!(!d.wants(&frame(i * m, true, false)), "{i} is a duplicate");
        }
        for i in [-1, 100, 149, 200, 499, 501] {
            assert!(!d.contains(i * m), "{i}");
            assert!(d.wants(&frame(i * m, true, false)), "{i} was not replayed");
        }
        assert!(d.wants(&frame(50 * m, true, true)), "a correction goes out");
        assert!(!d.wants(&frame(500 * m, false, false)), "an older partial");
        assert!(d.wants(&frame(501 * m, false, false)), "the forming candle");
    }
}
