//! The fan-out hub between the daemon's producers (the live stream sink, the indicator tasks,
//! or the standalone server's ClickHouse follower) and the client server's connections: a
//! producer publishes an event once; the hub renders its frame once (only if someone
//! subscribed) and offers it to every subscriber's bounded queue without waiting. A subscriber
//! whose queue is full is a slow consumer: it is cut off (its connection is told, and closes
//! with 1008) and never delays the producer or anyone else.
//!
//! The hub also keeps each channel's final frames that are published but not yet stored. A
//! replay (`since`) reads ClickHouse, and the embedded server publishes a candle before the
//! writer has stored it: a client subscribing in between would find the candle neither in
//! ClickHouse nor among the frames published after it subscribed. [`Hub::subscribe_since`]
//! hands it those pending frames first (the replay's seam drops the ones it also read from
//! ClickHouse); the writer's commits ([`Hub::confirm`]) let the hub forget them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

use crate::lock;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, Channel};
use crate::market::{Kline, PairKey};
use crate::store::writer::Committed;
use qs_core::indicators::Spec;

/// Pending (published, not yet known to be stored) frames kept per channel, at most: a writer
/// this far behind for one series makes a replay that starts meanwhile miss the oldest ones.
pub const PENDING_MAX: usize = 10_000;

/// One rendered event, shared by every subscriber it goes to.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Shared, not copied, by every connection it goes to (reference-counted bytes).
    pub text: Utf8Bytes,
    /// The candle's open time (a replay/live seam drops live frames it already replayed).
    pub open_time: i64,
    /// A closed candle or an indicator value (false: an in-progress candle).
    pub is_final: bool,
    /// An indicator value recomputed after a late candle: a correction, never dropped as a
    /// duplicate of a replayed one.
    pub correction: bool,
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
    /// Older candles (a backfill, a hole healed far back) are not this subscription's
    /// business: `since` for a replay, else the candle before the one forming at subscribe.
    floor: i64,
    /// What its replay sent: a final frame of one of those candles is never sent again (a
    /// candle the writer committed just before the replay read it is published by the commit
    /// hook just after), unless it is a correction.
    replayed: Option<super::replay::Delivered>,
}

/// A pending final event: a rendered candle frame, or an indicator's values (rendered only if
/// a replay asks: a computation over history publishes far more than anyone subscribes to).
#[derive(Debug, Clone)]
enum Pending {
    Frame(Frame),
    Indicator(IndicatorEvent, bool),
}

impl Pending {
    fn open_time(&self) -> i64 {
        match self {
            Pending::Frame(f) => f.open_time,
            Pending::Indicator(e, _) => e.open_time,
        }
    }

    /// The frame to send; an indicator event is rendered for `pair` and `indicator` (the
    /// normalised spec of the channel it is kept on).
    fn frame(&self, pair: &PairKey, indicator: &str) -> Frame {
        match self {
            Pending::Frame(f) => f.clone(),
            Pending::Indicator(e, correction) => indicator_frame(pair, indicator, e, *correction),
        }
    }
}

fn kline_frame(k: &Kline) -> Frame {
    Frame {
        text: Utf8Bytes::from(protocol::kline(k)),
        open_time: k.open_time,
        is_final: k.is_final,
        correction: false,
    }
}

/// The `open_time`s of the last [`PUBLISHED_MEMORY`] closed candles a channel published: a
/// candle stored twice (a REST refill overlapping the stream) is sent once.
#[derive(Debug, Default)]
struct Published {
    recent: VecDeque<i64>,
}

/// Closed candles remembered per channel to send each once.
pub const PUBLISHED_MEMORY: usize = 512;

impl Published {
    /// Records `t`; false if it was recorded already.
    fn mark(&mut self, t: i64) -> bool {
        // Newest first: repeats are nearly always of recent candles.
        if self.recent.iter().rev().any(|&x| x == t) {
            return false;
        }
        if self.recent.len() == PUBLISHED_MEMORY {
            self.recent.pop_front();
        }
        self.recent.push_back(t);
        true
    }
}

fn indicator_frame(pair: &PairKey, name: &str, e: &IndicatorEvent, correction: bool) -> Frame {
    Frame {
        text: Utf8Bytes::from(protocol::indicator(
            pair,
            name,
            e.open_time,
            &e.values,
            correction,
        )),
        open_time: e.open_time,
        is_final: true,
        correction,
    }
}

#[derive(Debug, Default)]
struct ChannelState {
    subs: Vec<Sub>,
    /// Final events published and not yet confirmed stored, oldest first.
    pending: VecDeque<Pending>,
    /// Closed candles sent (klines channels).
    published: Published,
}

impl ChannelState {
    fn remember(&mut self, p: Pending) {
        if self.pending.len() == PENDING_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back(p);
    }
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

/// What [`Hub::retarget_when_drained`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retarget {
    /// Moved: every later frame goes to the new target.
    Moved,
    /// Not moved: frames are still waiting in the staging queue; take them and try again.
    Pending,
    /// The subscription is gone (cut off as slow, or unsubscribed).
    Gone,
}

/// One indicator's outputs at one candle, for [`Hub::publish_indicators`] (defined with the
/// reads that produce it, below the server in the layers).
pub use crate::store::replay::IndicatorEvent;

/// Counts a follower's looks: the number of the last one started, and of the last one done.
#[derive(Debug)]
struct Looks {
    attached: std::sync::atomic::AtomicBool,
    started: AtomicU64,
    done: tokio::sync::watch::Sender<u64>,
}

impl Default for Looks {
    fn default() -> Self {
        Looks {
            attached: Default::default(),
            started: AtomicU64::new(0),
            done: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Cheap to clone; producers and connections share one.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    /// The standalone server's follower's looks at ClickHouse (see [`Hub::fresh_look`]).
    looks: Arc<Looks>,
    /// Set while no client server runs: publishing is then a no-op.
    idle: Arc<std::sync::atomic::AtomicBool>,
    channels: Arc<Mutex<HashMap<Channel, ChannelState>>>,
    next: Arc<AtomicU64>,
    stats: Arc<HubStats>,
}

impl Hub {
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// A follower (the standalone server's) feeds this hub from ClickHouse: replays then wait
    /// for one of its looks before going live ([`fresh_look`](Self::fresh_look)).
    pub fn attach_follower(&self) {
        self.looks.attached.store(true, Ordering::SeqCst);
    }

    /// The follower starts a look: its number, for [`look_done`](Self::look_done).
    pub fn look_started(&self) -> u64 {
        self.looks.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The follower published everything look `n` found.
    pub fn look_done(&self, n: u64) {
        self.looks.done.send_modify(|d| *d = (*d).max(n));
    }

    /// With a follower attached: waits until a look that started after this call is done, so
    /// every row visible now has been published (a replay that read ClickHouse before this
    /// call finds them in its staging queue, not after it went live). At once without one.
    pub async fn fresh_look(&self) {
        if !self.looks.attached.load(Ordering::SeqCst) {
            return;
        }
        let after = self.looks.started.load(Ordering::SeqCst);
        let mut done = self.looks.done.subscribe();
        let _ = done.wait_for(|d| *d > after).await;
    }

    /// Whether a client server is being fed (producers skip building events otherwise).
    pub fn is_active(&self) -> bool {
        !self.idle.load(Ordering::Relaxed)
    }

    /// Turns publishing on (a client server runs) or off (none does: everything kept is
    /// dropped, since no one will replay from it).
    pub fn set_active(&self, active: bool) {
        self.idle.store(!active, Ordering::Relaxed);
        if !active {
            lock(&self.channels).clear();
        }
    }

    /// Starts delivering `channel`'s events to `target` (in-progress candles too when
    /// `partial`).
    pub fn subscribe(&self, channel: Channel, partial: bool, target: Target) -> SubId {
        self.subscribe_since(channel, partial, target, None)
    }

    /// As [`subscribe`](Self::subscribe), and first offers `target` the channel's recent final
    /// frames with `open_time >= since` (when `since` is given), all under one lock: no frame
    /// published meanwhile is missed or sent twice.
    pub fn subscribe_since(
        &self,
        channel: Channel,
        partial: bool,
        target: Target,
        since: Option<i64>,
    ) -> SubId {
        let id = SubId(self.next.fetch_add(1, Ordering::Relaxed));
        let period = channel.pair().period;
        let floor = since.unwrap_or_else(|| {
            let forming = period.align(crate::market::now_ms());
            forming.saturating_sub(period.longest_ms())
        });
        let mut channels = lock(&self.channels);
        let state = channels.entry(channel.clone()).or_default();
        if let Some(since) = since {
            let indicator = match &channel {
                Channel::Indicator(_, spec) => spec.to_string(),
                Channel::Klines(_) => String::new(),
            };
            for p in state.pending.iter().filter(|p| p.open_time() >= since) {
                if target
                    .queue
                    .try_send(p.frame(channel.pair(), &indicator))
                    .is_err()
                {
                    self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    target.slow.cancel();
                    return id;
                }
            }
        }
        state.subs.push(Sub {
            id,
            partial,
            target,
            floor,
            replayed: None,
        });
        id
    }

    /// A commit stored these rows: pending events it covers are forgotten, and stored closed
    /// candles that were never published (fetched by REST to fill a hole, backfilled) are
    /// published now, once.
    pub fn confirm(&self, what: Committed<'_>) {
        if !self.is_active() {
            return;
        }
        match what {
            Committed::Klines(rows) => {
                let mut channels = lock(&self.channels);
                let mut at: Option<(&PairKey, Option<&mut ChannelState>)> = None;
                for k in rows.iter().filter(|k| k.is_final) {
                    if at.as_ref().is_none_or(|(p, _)| *p != &k.pair) {
                        // One lookup per run of rows of one pair.
                        let state = channels.get_mut(&Channel::Klines(k.pair.clone()));
                        at = Some((&k.pair, state));
                    }
                    let Some((_, Some(state))) = at.as_mut() else {
                        continue;
                    };
                    if let Some(i) = state
                        .pending
                        .iter()
                        .position(|p| p.open_time() == k.open_time)
                    {
                        state.pending.remove(i);
                    } else if state.subs.is_empty() {
                        // Nobody to tell; a later subscriber replays it from ClickHouse.
                        state.published.mark(k.open_time);
                    } else if state.published.mark(k.open_time) {
                        let frame = kline_frame(k);
                        self.offer(state, &frame);
                    }
                }
            }
            Committed::Indicator {
                pair,
                indicator,
                earliest,
                latest,
            } => {
                let Ok(spec) = Spec::parse(indicator) else {
                    return;
                };
                let channel = Channel::Indicator(pair.clone(), spec);
                if let Some(state) = lock(&self.channels).get_mut(&channel) {
                    state
                        .pending
                        .retain(|p| !(earliest..=latest).contains(&p.open_time()));
                }
            }
        }
    }

    /// Events pending (published, not confirmed stored) on `channel`.
    pub fn pending(&self, channel: &Channel) -> usize {
        lock(&self.channels)
            .get(channel)
            .map_or(0, |c| c.pending.len())
    }

    /// Sends a subscription's frames to `target` from now on (the end of a replay: from the
    /// staging queue to the connection's queue), but only if `staging` holds no frame: the
    /// check and the move happen under the lock every publisher takes, so no frame can land
    /// in `staging` after the caller took the last one.
    pub fn retarget_when_drained(
        &self,
        channel: &Channel,
        id: SubId,
        target: &Target,
        staging: &mpsc::Receiver<Frame>,
        replayed: &super::replay::Delivered,
    ) -> Retarget {
        let mut channels = lock(&self.channels);
        let Some(sub) = channels
            .get_mut(channel)
            .and_then(|c| c.subs.iter_mut().find(|s| s.id == id))
        else {
            return Retarget::Gone;
        };
        if !staging.is_empty() {
            return Retarget::Pending;
        }
        sub.target = target.clone();
        sub.replayed = Some(replayed.clone());
        Retarget::Moved
    }

    pub fn unsubscribe(&self, channel: &Channel, id: SubId) {
        if let Some(c) = lock(&self.channels).get_mut(channel) {
            c.subs.retain(|s| s.id != id);
        }
    }

    /// Subscriptions to `channel` right now.
    pub fn subscribers(&self, channel: &Channel) -> usize {
        lock(&self.channels)
            .get(channel)
            .map_or(0, |c| c.subs.len())
    }

    /// The channels that have subscribers right now.
    pub fn subscribed_channels(&self) -> Vec<Channel> {
        lock(&self.channels)
            .iter()
            .filter(|(_, c)| !c.subs.is_empty())
            .map(|(ch, _)| ch.clone())
            .collect()
    }

    /// Subscriptions to every channel right now.
    pub fn subscriptions(&self) -> usize {
        lock(&self.channels).values().map(|c| c.subs.len()).sum()
    }

    /// A candle (closed, or in progress for `partial` subscribers) not yet stored: a closed one
    /// is kept until [`confirm`](Self::confirm)ed.
    pub fn publish_kline(&self, k: &Kline) {
        self.kline(k, true);
    }

    /// A candle read from ClickHouse (the standalone server's follower): nothing to keep.
    pub fn publish_stored_kline(&self, k: &Kline) {
        self.kline(k, false);
    }

    fn kline(&self, k: &Kline, keep: bool) {
        if !self.is_active() {
            return;
        }
        let channel = Channel::Klines(k.pair.clone());
        let mut channels = lock(&self.channels);
        let state = match channels.get_mut(&channel) {
            Some(s) => s,
            None if k.is_final && keep => channels.entry(channel).or_default(),
            None => return,
        };
        if k.is_final {
            if !state.published.mark(k.open_time) {
                return; // sent already (a candle stored twice, or seen twice)
            }
            let frame = kline_frame(k);
            self.offer(state, &frame);
            if keep {
                state.remember(Pending::Frame(frame));
            }
        } else if state.subs.iter().any(|s| s.partial) {
            self.offer(state, &kline_frame(k));
        }
    }

    /// An indicator's values at one or more candles, in `open_time` order, not yet stored
    /// (kept until confirmed, unless `stored`); those at or before `corrected_upto` are
    /// corrections (recomputed after a late candle). Rendered only for subscribers.
    pub fn publish_indicators(
        &self,
        pair: &PairKey,
        spec: &Spec,
        events: &[IndicatorEvent],
        corrected_upto: Option<i64>,
        stored: bool,
    ) {
        if events.is_empty() || !self.is_active() {
            return;
        }
        let channel = Channel::Indicator(pair.clone(), spec.clone());
        let mut channels = lock(&self.channels);
        let state = match channels.get_mut(&channel) {
            Some(s) => s,
            None if !stored => channels.entry(channel).or_default(),
            None => return,
        };
        let name = (!state.subs.is_empty()).then(|| spec.to_string());
        // Only the last PENDING_MAX can stay pending.
        let keep_from = if stored {
            events.len()
        } else {
            events.len().saturating_sub(PENDING_MAX)
        };
        for (i, e) in events.iter().enumerate() {
            let correction = corrected_upto.is_some_and(|c| e.open_time <= c);
            if let Some(name) = &name {
                let frame = indicator_frame(pair, name, e, correction);
                self.offer(state, &frame);
            }
            if i >= keep_from {
                state.remember(Pending::Indicator(e.clone(), correction));
            }
        }
    }

    /// Offers `frame` to every subscriber of the channel that wants it; cuts off the ones whose
    /// queue is full or gone.
    fn offer(&self, state: &mut ChannelState, frame: &Frame) {
        state.subs.retain(|s| {
            if (!frame.is_final && !s.partial) || frame.open_time < s.floor {
                return true;
            }
            if frame.is_final
                && !frame.correction
                && s.replayed
                    .as_ref()
                    .is_some_and(|r| r.contains(frame.open_time))
            {
                return true;
            }
            match s.target.queue.try_send(frame.clone()) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::{Decimal, Source};

    /// The `i`-th one-minute candle from the minute these tests started (live subscriptions
    /// only get candles from the one before the forming one on).
    fn at(i: i64) -> i64 {
        static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
        *BASE.get_or_init(|| crate::market::Period::M1.align(crate::market::now_ms())) + i * 60_000
    }

    fn candle(pair: &PairKey, i: i64, is_final: bool) -> Kline {
        let d = |m: i128| Decimal::from_mantissa(m);
        Kline {
            pair: pair.clone(),
            open_time: at(i),
            close_time: at(i) + 59_999,
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
        assert!(fa.is_final && fa.open_time == at(1));
        assert!(ra.try_recv().is_err(), "no partial for a");
        let (p, f) = (rb.try_recv().unwrap(), rb.try_recv().unwrap());
        assert!(!p.is_final && f.is_final);
        assert_eq!(
            fa.text.as_str().as_ptr(),
            f.text.as_str().as_ptr(),
            "rendered once"
        );
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
        assert_eq!(got, (0..10).map(at).collect::<Vec<_>>());
    }

    #[test]
    fn retarget_waits_for_a_drained_staging_queue_and_unsubscribe_ends_it() {
        let hub = Hub::default();
        let pair = PairKey::parse("cm", "BTCUSD_PERP", "1h").unwrap();
        let ch = Channel::Klines(pair.clone());
        let (staging, mut rs) = target(8);
        let (main, mut rm) = target(8);
        let none = super::super::replay::Delivered::new(pair.period);
        let id = hub.subscribe(ch.clone(), false, staging);
        hub.publish_kline(&candle(&pair, 1, true));
        assert_eq!(
            hub.retarget_when_drained(&ch, id, &main, &rs, &none),
            Retarget::Pending,
            "a frame still waits in staging"
        );
        assert_eq!(rs.try_recv().unwrap().open_time, at(1));
        assert_eq!(
            hub.retarget_when_drained(&ch, id, &main, &rs, &none),
            Retarget::Moved
        );
        hub.publish_kline(&candle(&pair, 2, true));
        assert!(rs.try_recv().is_err());
        assert_eq!(rm.try_recv().unwrap().open_time, at(2));
        hub.unsubscribe(&ch, id);
        assert_eq!(hub.subscribers(&ch), 0);
        hub.publish_kline(&candle(&pair, 3, true));
        assert!(rm.try_recv().is_err());
        assert_eq!(
            hub.retarget_when_drained(&ch, id, &target(1).0, &rs, &none),
            Retarget::Gone
        );
    }

    #[test]
    fn a_replaying_subscriber_gets_the_pending_frames_from_since_until_confirmed() {
        let hub = Hub::default();
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let ch = Channel::Klines(pair.clone());
        // Published before anyone subscribed (the writer has not stored them yet).
        for i in 0..100 {
            hub.publish_kline(&candle(&pair, i, true));
        }
        hub.publish_kline(&candle(&pair, 100, false));
        let drain = |rx: &mut mpsc::Receiver<Frame>| -> Vec<i64> {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|f| {
                    assert!(f.is_final, "no in-progress candle from memory");
                    (f.open_time - at(0)) / 60_000
                })
                .collect()
        };
        let (t, mut rx) = target(1000);
        hub.subscribe_since(ch.clone(), true, t, Some(at(60)));
        assert_eq!(drain(&mut rx), (60..100).collect::<Vec<_>>());
        // The writer stored 0..=79: only 80.. stay pending.
        let stored: Vec<Kline> = (0..80).map(|i| candle(&pair, i, true)).collect();
        hub.confirm(Committed::Klines(&stored));
        assert_eq!(hub.pending(&ch), 20);
        let (t, mut rx) = target(1000);
        hub.subscribe_since(ch.clone(), false, t, Some(0));
        assert_eq!(drain(&mut rx), (80..100).collect::<Vec<_>>());
        // Live only: nothing from memory.
        let (t, mut rx) = target(1000);
        hub.subscribe(ch.clone(), false, t);
        assert!(rx.try_recv().is_err());
        // Read from ClickHouse: nothing kept.
        hub.publish_stored_kline(&candle(&pair, 200, true));
        assert_eq!(hub.pending(&ch), 20);
        assert_eq!(rx.try_recv().unwrap().open_time, at(200));
    }

    #[test]
    fn indicator_batches_render_for_subscribers_and_stay_pending_until_stored() {
        let hub = Hub::default();
        let pair = PairKey::parse("spot", "ETHUSDT", "1h").unwrap();
        let spec = Spec::parse("macd(12,26,9)").unwrap();
        let ch = Channel::Indicator(pair.clone(), spec.clone());
        let ev = |i: i64| IndicatorEvent {
            open_time: i,
            values: vec![("macd", i as f64), ("signal", 0.5), ("hist", -0.5)],
        };
        let history: Vec<IndicatorEvent> = (0..(PENDING_MAX as i64 + 500)).map(ev).collect();
        hub.publish_indicators(&pair, &spec, &history, None, false);
        assert_eq!(hub.pending(&ch), PENDING_MAX);
        hub.confirm(Committed::Indicator {
            pair: &pair,
            indicator: "macd(12,26,9)",
            earliest: 0,
            latest: PENDING_MAX as i64 - 1,
        });
        let (t, mut rx) = target(2000);
        hub.subscribe_since(ch.clone(), false, t, Some(0));
        let kept: Vec<(i64, String)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|f| (f.open_time, f.text.to_string()))
            .collect();
        assert_eq!(
            kept.iter().map(|k| k.0).collect::<Vec<_>>(),
            (PENDING_MAX as i64..PENDING_MAX as i64 + 500).collect::<Vec<_>>()
        );
        let v: serde_json::Value = serde_json::from_str(&kept[0].1).unwrap();
        assert_eq!(v["indicator"], "macd(12,26,9)");
        assert_eq!(v["data"]["values"]["macd"], PENDING_MAX as f64);
        // A recomputation from 998: 998 and 999 are corrections, 1000 is new.
        hub.publish_indicators(
            &pair,
            &spec,
            &[ev(998), ev(999), ev(1000)],
            Some(999),
            false,
        );
        let got: Vec<(i64, bool)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|f| (f.open_time, f.correction))
            .collect();
        assert_eq!(got, vec![(998, true), (999, true), (1000, false)]);
    }

    #[test]
    fn stored_candles_that_never_went_live_are_published_once() {
        let hub = Hub::default();
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let ch = Channel::Klines(pair.clone());
        let (t, mut rx) = target(100);
        hub.subscribe(ch.clone(), false, t);
        // 5 goes live, then the writer stores 3..=6 (3, 4 and 6 fetched by REST).
        hub.publish_kline(&candle(&pair, 5, true));
        let rows: Vec<Kline> = (3..7).map(|i| candle(&pair, i, true)).collect();
        hub.confirm(Committed::Klines(&rows));
        // Stored again (an overlapping refill): nothing new.
        hub.confirm(Committed::Klines(&rows));
        hub.publish_kline(&candle(&pair, 6, true));
        let got: Vec<i64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|f| (f.open_time - at(0)) / 60_000)
            .collect();
        assert_eq!(got, vec![5, 3, 4, 6], "each once");
        assert_eq!(hub.pending(&ch), 0);
    }

    #[test]
    fn a_replayed_candle_committed_late_is_not_sent_again() {
        let hub = Hub::default();
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let ch = Channel::Klines(pair.clone());
        let (staging, rs) = target(8);
        let (main, mut rm) = target(8);
        let id = hub.subscribe_since(ch.clone(), false, staging, Some(at(0)));
        // The replay read 0..=2 (2 was committed just before the read, its hook not run yet).
        let mut replayed = super::super::replay::Delivered::new(pair.period);
        for i in 0..3 {
            replayed.push(at(i));
        }
        assert_eq!(
            hub.retarget_when_drained(&ch, id, &main, &rs, &replayed),
            Retarget::Moved
        );
        let late: Vec<Kline> = (2..4).map(|i| candle(&pair, i, true)).collect();
        hub.confirm(Committed::Klines(&late));
        let got: Vec<i64> = std::iter::from_fn(|| rm.try_recv().ok())
            .map(|f| (f.open_time - at(0)) / 60_000)
            .collect();
        assert_eq!(got, vec![3], "2 was replayed already");
    }
}
