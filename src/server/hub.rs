//! The fan-out hub between the daemon's producers (the live stream sink, the indicator tasks)
//! and the client server's connections: a producer publishes an event once; the hub renders its
//! frame once (only if someone subscribed) and offers it to every subscriber's bounded queue
//! without waiting. A subscriber whose queue is full is a slow consumer: it is cut off (its
//! connection is told, and closes with 1008) and never delays the producer or anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::lock;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, Channel};
use crate::market::{Kline, PairKey};

/// One rendered event, shared by every subscriber it goes to.
#[derive(Debug, Clone)]
pub struct Frame {
    pub text: Arc<str>,
    /// The candle's open time (a replay/live seam drops live frames it already replayed).
    pub open_time: i64,
    /// A closed candle or an indicator value (false: an in-progress candle).
    pub is_final: bool,
}

/// Identifies one subscription of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubId(u64);

/// Where a subscription's frames go, and how its connection is told that it is too slow.
#[derive(Debug, Clone)]
pub struct Target {
    pub queue: mpsc::Sender<Frame>,
    /// Cancelled by the hub when `queue` is full.
    pub slow: CancellationToken,
}

#[derive(Debug)]
struct Sub {
    id: SubId,
    partial: bool,
    target: Target,
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    frames_queued: AtomicU64,
    slow_consumers: AtomicU64,
}

impl HubStats {
    pub fn frames_queued(&self) -> u64 {
        self.frames_queued.load(Ordering::Relaxed)
    }
    pub fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }
}

/// Cheap to clone; producers and connections share one.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    subs: Arc<Mutex<HashMap<Channel, Vec<Sub>>>>,
    next: Arc<AtomicU64>,
    stats: Arc<HubStats>,
}

impl Hub {
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// Starts delivering `channel`'s events to `target` (in-progress candles too when
    /// `partial`).
    pub fn subscribe(&self, channel: Channel, partial: bool, target: Target) -> SubId {
        let id = SubId(self.next.fetch_add(1, Ordering::Relaxed));
        lock(&self.subs).entry(channel).or_default().push(Sub {
            id,
            partial,
            target,
        });
        id
    }

    /// Sends a subscription's frames elsewhere from now on (the end of a replay: from the
    /// staging queue to the connection's queue). False if it is gone.
    pub fn retarget(&self, channel: &Channel, id: SubId, target: Target) -> bool {
        let mut subs = lock(&self.subs);
        match subs
            .get_mut(channel)
            .and_then(|list| list.iter_mut().find(|s| s.id == id))
        {
            Some(s) => {
                s.target = target;
                true
            }
            None => false,
        }
    }

    pub fn unsubscribe(&self, channel: &Channel, id: SubId) {
        let mut subs = lock(&self.subs);
        if let Some(list) = subs.get_mut(channel) {
            list.retain(|s| s.id != id);
            if list.is_empty() {
                subs.remove(channel);
            }
        }
    }

    /// Subscriptions to `channel` right now.
    pub fn subscribers(&self, channel: &Channel) -> usize {
        lock(&self.subs).get(channel).map_or(0, Vec::len)
    }

    /// A candle (closed, or in progress for `partial` subscribers).
    pub fn publish_kline(&self, k: &Kline) {
        let channel = Channel::Klines(k.pair.clone());
        self.publish(&channel, k.is_final, || Frame {
            text: Arc::from(protocol::kline(k)),
            open_time: k.open_time,
            is_final: k.is_final,
        });
    }

    /// One output of an indicator at one candle.
    pub fn publish_indicator(
        &self,
        pair: &PairKey,
        spec: &crate::tasks::indicators::api::Spec,
        open_time: i64,
        output: &str,
        value: f64,
    ) {
        let channel = Channel::Indicator(pair.clone(), spec.clone());
        self.publish(&channel, true, || Frame {
            text: Arc::from(protocol::indicator_value(
                pair,
                &spec.to_string(),
                open_time,
                output,
                value,
            )),
            open_time,
            is_final: true,
        });
    }

    /// Offers the frame (rendered at most once) to every subscriber of `channel`; cuts off the
    /// ones whose queue is full or gone.
    fn publish(&self, channel: &Channel, is_final: bool, render: impl FnOnce() -> Frame) {
        let mut subs = lock(&self.subs);
        let Some(list) = subs.get_mut(channel) else {
            return;
        };
        if !list.iter().any(|s| is_final || s.partial) {
            return;
        }
        let frame = render();
        list.retain(|s| {
            if !is_final && !s.partial {
                return true;
            }
            let f = frame.clone();
            match s.target.queue.try_send(f) {
                Ok(()) => {
                    self.stats.frames_queued.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    s.target.slow.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if list.is_empty() {
            subs.remove(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::{Decimal, Source};

    fn candle(pair: &PairKey, i: i64, is_final: bool) -> Kline {
        let d = |m: i128| Decimal::from_mantissa(m);
        Kline {
            pair: pair.clone(),
            open_time: i * 60_000,
            close_time: i * 60_000 + 59_999,
            open: d(100),
            high: d(200),
            low: d(50),
            close: d(150),
            volume: d(1),
            quote_volume: d(2),
            trades: 1,
            taker_buy_volume: d(0),
            taker_buy_quote_volume: d(0),
            is_final,
            source: Source::Ws,
        }
    }

    fn target(cap: usize) -> (Target, mpsc::Receiver<Frame>) {
        let (queue, rx) = mpsc::channel(cap);
        (
            Target {
                queue,
                slow: CancellationToken::new(),
            },
            rx,
        )
    }

    #[test]
    fn each_subscriber_gets_the_same_rendered_frame_and_partials_only_if_asked() {
        let hub = Hub::default();
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let other = PairKey::parse("um", "ETHUSDT", "1m").unwrap();
        let (a, mut ra) = target(8);
        let (b, mut rb) = target(8);
        let (c, mut rc) = target(8);
        hub.subscribe(Channel::Klines(pair.clone()), false, a);
        hub.subscribe(Channel::Klines(pair.clone()), true, b);
        hub.subscribe(Channel::Klines(other.clone()), true, c);
        hub.publish_kline(&candle(&pair, 1, false));
        hub.publish_kline(&candle(&pair, 1, true));
        let fa = ra.try_recv().unwrap();
        assert!(fa.is_final && fa.open_time == 60_000);
        assert!(ra.try_recv().is_err(), "no partial for a");
        let (p, f) = (rb.try_recv().unwrap(), rb.try_recv().unwrap());
        assert!(!p.is_final && f.is_final);
        assert!(Arc::ptr_eq(&fa.text, &f.text), "rendered once");
        assert!(
            rc.try_recv().is_err(),
            "another pair's subscriber gets nothing"
        );
        assert_eq!(hub.stats().frames_queued(), 3);
    }

    #[test]
    fn a_full_queue_cuts_that_subscriber_off_and_no_one_else() {
        let hub = Hub::default();
        let pair = PairKey::parse("spot", "BTCUSDT", "1m").unwrap();
        let ch = Channel::Klines(pair.clone());
        let (slow, _never_read) = target(2);
        let slow_token = slow.slow.clone();
        let (fast, mut rf) = target(100);
        hub.subscribe(ch.clone(), false, slow);
        hub.subscribe(ch.clone(), false, fast);
        for i in 0..10 {
            hub.publish_kline(&candle(&pair, i, true));
        }
        assert!(slow_token.is_cancelled(), "told to close");
        assert_eq!(hub.stats().slow_consumers(), 1);
        assert_eq!(hub.subscribers(&ch), 1, "the slow one is gone");
        let got: Vec<i64> = std::iter::from_fn(|| rf.try_recv().ok())
            .map(|f| f.open_time)
            .collect();
        assert_eq!(got, (0..10).map(|i| i * 60_000).collect::<Vec<_>>());
    }

    #[test]
    fn retarget_moves_a_subscription_and_unsubscribe_ends_it() {
        let hub = Hub::default();
        let pair = PairKey::parse("cm", "BTCUSD_PERP", "1h").unwrap();
        let ch = Channel::Klines(pair.clone());
        let (staging, mut rs) = target(8);
        let (main, mut rm) = target(8);
        let id = hub.subscribe(ch.clone(), false, staging);
        hub.publish_kline(&candle(&pair, 1, true));
        assert!(hub.retarget(&ch, id, main));
        hub.publish_kline(&candle(&pair, 2, true));
        assert_eq!(rs.try_recv().unwrap().open_time, 60_000);
        assert!(rs.try_recv().is_err());
        assert_eq!(rm.try_recv().unwrap().open_time, 120_000);
        hub.unsubscribe(&ch, id);
        assert_eq!(hub.subscribers(&ch), 0);
        hub.publish_kline(&candle(&pair, 3, true));
        assert!(rm.try_recv().is_err());
        assert!(!hub.retarget(&ch, id, target(1).0), "gone");
    }
}
