//! The clock of the simulator's rate limiter: it alone decides REQUEST_WEIGHT windows,
//! `Retry-After` and IP bans. The wall clock by default (Binance aligns its windows to real
//! time, and the `sim-exchange` command and streaming tests need that); tests inject a manual
//! clock they step, or the wall clock shifted by an offset, so that window boundaries are set
//! rather than waited for. Candles, `serverTime`, the request log and WebSocket streams stay on
//! the wall clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qs_core::market::now_ms;

/// Where the rate limiter's time comes from.
#[derive(Debug, Clone, Default)]
pub enum SimClock {
    /// The wall clock (Unix ms).
    #[default]
    System,
    /// Time that moves only when the test sets or advances it.
    Manual(ManualClock),
    /// The wall clock plus an offset the test sets (a server whose clock is off).
    Offset(OffsetClock),
}

impl SimClock {
    /// The time in Unix ms.
    pub fn now_ms(&self) -> i64 {
        match self {
            SimClock::System => now_ms(),
            SimClock::Manual(c) => c.now_ms(),
            SimClock::Offset(c) => c.now_ms(),
        }
    }
}

/// A clock that stands still until told otherwise. Clones share the time, so a test keeps one
/// and hands a clone to the simulator.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: i64) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(start_ms)))
    }

    pub fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Sets the time (it may go back, like a wall clock can).
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ms))
            });
    }
}

/// The wall clock shifted by a settable offset. Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct OffsetClock(Arc<AtomicI64>);

impl OffsetClock {
    /// The wall clock, not shifted yet.
    pub fn new() -> OffsetClock {
        OffsetClock::default()
    }

    pub fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.0.load(Ordering::SeqCst))
    }

    /// Shifts the clock so that it reads `ms` now (and runs on from there with real time).
    pub fn set_now(&self, ms: i64) {
        self.0.store(ms.saturating_sub(now_ms()), Ordering::SeqCst);
    }

    /// Shifts the clock so that a window of `window` (aligned to the epoch, as Binance's are)
    /// starts now: the whole window is ahead.
    pub fn start_window_now(&self, window: Duration) {
        let len = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
        let next = self
            .now_ms()
            .div_euclid(len)
            .saturating_add(1)
            .saturating_mul(len);
        self.set_now(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let c = ManualClock::new(1_000);
        let sim = SimClock::Manual(c.clone());
        assert_eq!(sim.now_ms(), 1_000);
        c.advance(Duration::from_millis(2_500));
        assert_eq!(sim.now_ms(), 3_500);
        c.set(500);
        assert_eq!(sim.now_ms(), 500);
    }

    #[test]
    fn an_offset_clock_runs_with_the_wall_clock_from_where_it_was_set() {
        let c = OffsetClock::new();
        let sim = SimClock::Offset(c.clone());
        c.set_now(42_000);
        let t = sim.now_ms();
        assert!((42_000..42_000 + 5_000).contains(&t), "{t}");
        c.start_window_now(Duration::from_secs(60));
        let t = sim.now_ms();
        assert!(t.rem_euclid(60_000) < 5_000, "{t} is not at a window start");
        let wall = SimClock::System.now_ms();
        assert!((wall - now_ms()).abs() < 5_000);
    }
}
