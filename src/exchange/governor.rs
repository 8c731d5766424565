//! Rate governor: one REQUEST_WEIGHT budget per (market, egress address), shared by every task
//! in the process, so that no number of concurrent backfills can exceed it. It reserves weight
//! before a request, syncs with `X-MBX-USED-WEIGHT-*` after it, pauses after a 429, stops all
//! requests during a 418 ban and refuses requests through a blocked egress (403/451).
//! It does not send requests (the REST client does).
//!
//! The budget is enforced over a *sliding* window (the weight reserved in any span of one
//! window plus a small margin stays within the cap), not only per epoch-aligned window: that
//! is safe whether the exchange counts per calendar minute (Binance) or over a rolling minute,
//! and whatever the clock skew between us, since every fixed window is one such span.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::market::Market;

/// A REQUEST_WEIGHT budget: `limit` weight per fixed `window` (Binance: 6000 or 2400 per minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: u32,
    pub window: Duration,
}

impl Budget {
    /// Binance's documented defaults, used until `exchangeInfo` says otherwise.
    pub fn default_for(market: Market) -> Budget {
        Budget {
            limit: match market {
                Market::Spot => 6000,
                Market::Um | Market::Cm => 2400,
            },
            window: Duration::from_secs(60),
        }
    }
}

/// Why the governor will not let a request through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GovernorError {
    #[error("{market} egress {egress} is blocked by Binance (HTTP {status}): {reason}")]
    Blocked {
        market: Market,
        egress: String,
        status: u16,
        reason: String,
    },
}

/// Where time comes from: the wall clock (production) or tokio's clock from a fixed start
/// (tests under `tokio::time::pause()`, where windows must roll in virtual time).
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    Wall,
    Virtual { start_ms: i64, start: Instant },
}

impl Clock {
    pub fn virtual_from(start_ms: i64) -> Clock {
        Clock::Virtual {
            start_ms,
            start: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::Wall => crate::market::now_ms(),
            Clock::Virtual { start_ms, start } => {
                start_ms + i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX)
            }
        }
    }
}

/// All governors of the process, one per (market, egress).
#[derive(Debug)]
pub struct Governors {
    ratio: f64,
    clock: Clock,
    overrides: HashMap<Market, u32>,
    /// Budgets learned from `exchangeInfo`, for egresses that appear later (proxies).
    learned: Mutex<HashMap<Market, Budget>>,
    map: Mutex<HashMap<(Market, String), Arc<Governor>>>,
}

impl Governors {
    /// `ratio`: the fraction of each budget we use (`app.backfill.weight_budget_ratio`).
    pub fn new(ratio: f64) -> Governors {
        Governors::with_clock(ratio, Clock::Wall)
    }

    pub fn with_clock(ratio: f64, clock: Clock) -> Governors {
        Governors {
            ratio,
            clock,
            overrides: HashMap::new(),
            learned: Mutex::new(HashMap::new()),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// A configured limit (`app.binance.<market>.weight_limit`) that `exchangeInfo` must not
    /// replace.
    pub fn with_override(mut self, market: Market, limit: Option<u32>) -> Governors {
        if let Some(limit) = limit {
            self.overrides.insert(market, limit);
        }
        self
    }

    /// Adopts the budget `exchangeInfo` announced for every egress of `market`, present and
    /// future (each egress is its own address with its own budget of that size).
    pub fn adopt(&self, market: Market, budget: Budget) {
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(market, budget);
        let govs: Vec<Arc<Governor>> = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((m, _), _)| *m == market)
            .map(|(_, g)| g.clone())
            .collect();
        for g in govs {
            g.set_budget(budget);
        }
    }

    /// Every governor made so far (one per market and egress that was asked for).
    pub fn all(&self) -> Vec<Arc<Governor>> {
        let mut all: Vec<Arc<Governor>> = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| (a.market, &a.egress).cmp(&(b.market, &b.egress)));
        all
    }

    pub fn get(&self, market: Market, egress: &str) -> Arc<Governor> {
        let learned = self
            .learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&market)
            .copied();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry((market, egress.to_string()))
            .or_insert_with(|| {
                let mut budget = learned.unwrap_or_else(|| Budget::default_for(market));
                let overridden = self.overrides.get(&market).copied();
                if let Some(limit) = overridden {
                    budget.limit = limit;
                }
                Arc::new(Governor {
                    market,
                    egress: egress.to_string(),
                    ratio: self.ratio,
                    clock: self.clock,
                    state: Mutex::new(State {
                        budget,
                        overridden: overridden.is_some(),
                        log: VecDeque::new(),
                        in_log: 0,
                        pause_until: None,
                        ban_until: None,
                        blocked: None,
                        stats: GovernorStats::default(),
                    }),
                })
            })
            .clone()
    }
}

/// Counters of one governor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GovernorStats {
    /// Weight reserved by requests sent.
    pub weight: u64,
    pub http_429: u64,
    pub http_418: u64,
    /// Times a request had to wait for the budget, a pause or a ban.
    pub waits: u64,
}

#[derive(Debug)]
pub struct Governor {
    market: Market,
    egress: String,
    ratio: f64,
    clock: Clock,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    budget: Budget,
    overridden: bool,
    /// Reservations of the last window span: (when, wall-clock ms, weight). Header syncs and
    /// 429s add entries for weight we did not reserve ourselves.
    log: VecDeque<(Instant, i64, u32)>,
    /// Sum of the weights in `log`.
    in_log: u32,
    /// After a 429: no request before this.
    pause_until: Option<Instant>,
    /// During a 418 ban: no request before this.
    ban_until: Option<Instant>,
    /// 403/451: requests fail until this (then are tried again).
    blocked: Option<(Instant, u16, String)>,
    stats: GovernorStats,
}

/// Weight reserved for one request.
#[derive(Debug, Clone, Copy)]
pub struct Permit {
    /// Wall-clock ms of the reservation (to match the exchange's window in its reply).
    at_ms: i64,
    pub weight: u32,
}

impl State {
    /// Drops reservations older than one window span.
    fn prune(&mut self, now: Instant) {
        let span = self.budget.window + margin(self.budget.window);
        while let Some(&(at, _, w)) = self.log.front() {
            if at + span > now {
                break;
            }
            self.log.pop_front();
            self.in_log = self.in_log.saturating_sub(w);
        }
    }

    fn push(&mut self, now: Instant, wall: i64, weight: u32) {
        self.log.push_back((now, wall, weight));
        self.in_log = self.in_log.saturating_add(weight);
    }

    /// When enough of the oldest reservations will have aged out for `need` more weight.
    fn room_at(&self, need: u32, cap: u32) -> Instant {
        let span = self.budget.window + margin(self.budget.window);
        let mut left = self.in_log;
        for &(at, _, w) in &self.log {
            left = left.saturating_sub(w);
            if left + need <= cap {
                return at + span;
            }
        }
        Instant::now() + span
    }
}

impl Governor {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn market(&self) -> Market {
        self.market
    }

    pub fn egress(&self) -> &str {
        &self.egress
    }

    pub fn budget(&self) -> Budget {
        self.lock().budget
    }

    pub fn stats(&self) -> GovernorStats {
        self.lock().stats
    }

    /// The weight this process may use per window (`limit × ratio`, at least 1).
    pub fn usable(&self) -> u32 {
        usable(self.lock().budget.limit, self.ratio)
    }

    /// Weight counted in the current window span: reserved by our requests, plus what the
    /// exchange reported beyond them (header syncs, a 429).
    pub fn window_used(&self) -> u32 {
        let mut st = self.lock();
        st.prune(Instant::now());
        st.in_log
    }

    /// Weight still free in the current window span (for spreading work across egresses).
    pub fn remaining(&self) -> u32 {
        let mut st = self.lock();
        st.prune(Instant::now());
        usable(st.budget.limit, self.ratio).saturating_sub(st.in_log)
    }

    /// Until when no request may go out (a 429 pause, a 418 ban, a 403/451 block), if now.
    pub fn held_until(&self) -> Option<Instant> {
        let st = self.lock();
        let now = Instant::now();
        [
            st.pause_until,
            st.ban_until,
            st.blocked.as_ref().map(|b| b.0),
        ]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .max()
    }

    /// Adopts the budget `exchangeInfo` announced, unless the config overrides it.
    pub fn set_budget(&self, budget: Budget) {
        let mut st = self.lock();
        if st.overridden {
            st.budget.window = budget.window;
        } else {
            st.budget = budget;
        }
    }

    /// Waits until `weight` fits in the current window (and no pause or ban is running), then
    /// reserves it. Fails at once while the egress is blocked.
    pub async fn acquire(&self, weight: u32) -> Result<Permit, GovernorError> {
        let mut waited = false;
        loop {
            let until = {
                let mut st = self.lock();
                let now = Instant::now();
                if let Some((until, status, reason)) = &st.blocked {
                    if *until > now {
                        return Err(GovernorError::Blocked {
                            market: self.market,
                            egress: self.egress.clone(),
                            status: *status,
                            reason: reason.clone(),
                        });
                    }
                    st.blocked = None;
                }
                let hold = [st.ban_until, st.pause_until]
                    .into_iter()
                    .flatten()
                    .filter(|t| *t > now)
                    .max();
                match hold {
                    Some(t) => t,
                    None => {
                        st.ban_until = None;
                        st.pause_until = None;
                        st.prune(now);
                        let cap = usable(st.budget.limit, self.ratio);
                        let w = weight.min(cap);
                        if st.in_log + w <= cap {
                            let wall = self.clock.now_ms();
                            st.push(now, wall, w);
                            st.stats.weight += u64::from(weight);
                            crate::metrics::REST_WEIGHT
                                .inc(&[self.market.as_str(), &self.egress], u64::from(weight));
                            if waited {
                                st.stats.waits += 1;
                            }
                            return Ok(Permit {
                                at_ms: wall,
                                weight,
                            });
                        }
                        st.room_at(w, cap)
                    }
                }
            };
            waited = true;
            debug!(market = %self.market, egress = %self.egress, wait = ?until.saturating_duration_since(Instant::now()),
                "Waiting for request weight.");
            tokio::time::sleep_until(until).await;
        }
    }

    /// Syncs with the used weight Binance reported for a request sent with `permit` (its
    /// count for the current fixed window). Weight the exchange counted that we did not
    /// reserve (another program on the same address) is added; stale replies are ignored.
    pub fn observe_used(&self, permit: &Permit, used: u32) {
        let mut st = self.lock();
        let window_ms = window_ms(st.budget.window);
        let wall = self.clock.now_ms();
        let ws = permit.at_ms.div_euclid(window_ms) * window_ms;
        if wall.div_euclid(window_ms) * window_ms != ws {
            return;
        }
        st.prune(Instant::now());
        let ours: u32 = st
            .log
            .iter()
            .filter(|&&(_, at, _)| at >= ws)
            .map(|&(_, _, w)| w)
            .sum();
        if used > ours {
            st.push(Instant::now(), wall, used - ours);
        }
    }

    /// Treats the budget as fully used now: for an exchange that reports no used weight, the
    /// weight spent in this window before we started (a killed earlier run, another program)
    /// is unknown, so the first window is given up rather than risking a 429.
    pub fn assume_used_up(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        st.prune(now);
        let cap = usable(st.budget.limit, self.ratio);
        if st.in_log < cap {
            let fill = cap - st.in_log;
            let wall = self.clock.now_ms();
            st.push(now, wall, fill);
        }
        warn!(market = %self.market, egress = %self.egress,
            "The exchange reports no used weight; waiting one window before going at full speed.");
    }

    /// HTTP 429: stop for `Retry-After` (or until the window ends) and use no more weight in
    /// this window.
    pub fn on_429(&self, retry_after: Option<Duration>) {
        let mut st = self.lock();
        st.stats.http_429 += 1;
        crate::metrics::REST_429.inc(&[self.market.as_str(), &self.egress], 1);
        let wall = self.clock.now_ms();
        let window_ms = window_ms(st.budget.window);
        let to_window_end = Duration::from_millis(
            u64::try_from(wall.div_euclid(window_ms) * window_ms + window_ms - wall).unwrap_or(0),
        ) + margin(st.budget.window);
        let pause = retry_after.unwrap_or(to_window_end);
        let now = Instant::now();
        st.pause_until = Some(now + pause);
        // Treat the budget as used up for a whole span.
        st.prune(now);
        let cap = usable(st.budget.limit, self.ratio);
        if st.in_log < cap {
            let fill = cap - st.in_log;
            st.push(now, wall, fill);
        }
        warn!(market = %self.market, egress = %self.egress, pause = ?pause,
            "Binance answered 429 (too much weight); pausing this market.");
    }

    /// HTTP 418: the egress is banned; no request to this market until the ban ends.
    pub fn on_418(&self, retry_after: Option<Duration>) {
        let mut st = self.lock();
        st.stats.http_418 += 1;
        crate::metrics::REST_418.inc(&[self.market.as_str(), &self.egress], 1);
        let ban = retry_after.unwrap_or(Duration::from_secs(120));
        st.ban_until = Some(Instant::now() + ban);
        warn!(market = %self.market, egress = %self.egress, ban = ?ban,
            "Binance banned this address (418); no request to this market until the ban ends.");
    }

    /// HTTP 403/451: the egress is refused; requests fail for `for_` (then are tried again).
    pub fn on_blocked(&self, status: u16, for_: Duration, reason: String) {
        let mut st = self.lock();
        st.blocked = Some((Instant::now() + for_, status, reason));
    }
}

fn usable(limit: u32, ratio: f64) -> u32 {
    ((f64::from(limit) * ratio).floor() as u32).max(1)
}

fn window_ms(window: Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(60_000).max(1)
}

/// Extra span beyond the window: a request reserved now may reach the exchange a little
/// later, and must still not share one of its windows with the reservations a window ago.
fn margin(window: Duration) -> Duration {
    (window / 20).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_040_000; // a minute boundary

    fn governor(limit: u32) -> (Governors, Arc<Governor>) {
        let g = Governors::with_clock(1.0, Clock::virtual_from(T0));
        let gov = g.get(Market::Um, "direct");
        gov.set_budget(Budget {
            limit,
            window: Duration::from_secs(60),
        });
        (g, gov)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_the_next_window_when_the_budget_is_used() {
        let (_g, gov) = governor(10);
        let start = Instant::now();
        for _ in 0..2 {
            gov.acquire(5).await.unwrap();
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        gov.acquire(5).await.unwrap();
        // The first reservations age out after the window (60 s) plus the margin (1 s).
        assert_eq!(start.elapsed(), Duration::from_millis(61_000));
        assert_eq!(gov.stats().waits, 1);
        assert_eq!(gov.stats().weight, 15);
    }

    #[tokio::test(start_paused = true)]
    async fn no_span_of_one_window_exceeds_the_cap() {
        // Whether the exchange counts per calendar minute or over a rolling minute, and
        // whatever the skew, every 60 s span must stay within the budget.
        let (g, _) = governor(100);
        let mut tasks = Vec::new();
        for i in 0..120u64 {
            let gov = g.get(Market::Um, "direct");
            tasks.push(tokio::spawn(async move {
                // Arrivals spread over time, unlike a single burst.
                tokio::time::sleep(Duration::from_millis(i * 700)).await;
                gov.acquire(7).await.map(|_| Instant::now())
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap().unwrap());
        }
        times.sort();
        for (i, start) in times.iter().enumerate() {
            let in_span = times[i..]
                .iter()
                .take_while(|t| t.duration_since(*start) < Duration::from_secs(60))
                .count();
            assert!(in_span * 7 <= 100, "{in_span} requests within 60 s of {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_ratio_keeps_headroom() {
        let g = Governors::with_clock(0.9, Clock::virtual_from(T0));
        let gov = g.get(Market::Spot, "direct");
        assert_eq!(gov.usable(), 5400);
        gov.set_budget(Budget {
            limit: 120,
            window: Duration::from_secs(60),
        });
        assert_eq!(gov.usable(), 108);
    }

    #[tokio::test(start_paused = true)]
    async fn header_sync_only_raises_usage_in_the_same_window() {
        let (_g, gov) = governor(100);
        let p = gov.acquire(1).await.unwrap();
        // Another process on the same IP used 95: we learn it from the header.
        gov.observe_used(&p, 96);
        let start = Instant::now();
        gov.acquire(4).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        gov.acquire(4).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(60));
        // A stale header from the previous window changes nothing.
        gov.observe_used(&p, 99);
        let t = Instant::now();
        gov.acquire(90).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_for_retry_after_and_a_418_stops_everything_until_the_ban_ends() {
        let (_g, gov) = governor(1000);
        gov.on_429(Some(Duration::from_secs(7)));
        let start = Instant::now();
        gov.acquire(1).await.unwrap();
        // Retry-After, and the window is then treated as used up: the next window.
        assert!(
            start.elapsed() >= Duration::from_secs(7),
            "{:?}",
            start.elapsed()
        );
        gov.on_418(Some(Duration::from_secs(300)));
        let start = Instant::now();
        gov.acquire(1).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(300));
        assert_eq!(gov.stats().http_418, 1);
        assert_eq!(gov.stats().http_429, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_egress_fails_fast_until_it_expires() {
        let (_g, gov) = governor(1000);
        gov.on_blocked(451, Duration::from_secs(30), "restricted location".into());
        let err = gov.acquire(1).await.unwrap_err();
        assert!(err.to_string().contains("HTTP 451"), "{err}");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(gov.acquire(1).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_tasks_share_one_budget() {
        let (g, _) = governor(50);
        let gov = g.get(Market::Um, "direct");
        let start = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let gov = g.get(Market::Um, "direct");
                tokio::spawn(async move { gov.acquire(5).await.map(|_| Instant::now()) })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap().unwrap());
        }
        let first_window = times
            .iter()
            .filter(|t| t.duration_since(start) < Duration::from_secs(60))
            .count();
        assert_eq!(first_window, 10, "50 weight / 5 per request");
        assert_eq!(gov.stats().weight, 100);
        // Another egress has its own budget.
        let other = g.get(Market::Um, "127.0.0.2");
        let t = Instant::now();
        other.acquire(2400).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
