//! Request-weight accounting per (market, client IP) in fixed windows aligned to the epoch
//! (Binance), or optionally over a rolling window (a stricter stand-in), with Binance's
//! 429 → 418 escalation. Owns budgets and bans; knows nothing about HTTP.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use qs_core::market::Market;

/// A REQUEST_WEIGHT budget: `limit` weight per `window_secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    pub limit: u32,
    pub window_secs: u64,
}

impl Budget {
    pub(crate) fn new(limit: u32, window: Duration) -> Budget {
        let ms = window.as_millis().max(1000);
        let window_secs = u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX / 1000);
        Budget { limit, window_secs }
    }

    fn window_ms(self) -> i64 {
        i64::try_from(self.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// `(intervalNum, letter, exchangeInfo interval name)`, e.g. `(1, 'M', "MINUTE")`.
    pub(crate) fn interval(self) -> (u64, char, &'static str) {
        let s = self.window_secs;
        if s % 86_400 == 0 {
            (s / 86_400, 'D', "DAY")
        } else if s % 3_600 == 0 {
            (s / 3_600, 'H', "HOUR")
        } else if s % 60 == 0 {
            (s / 60, 'M', "MINUTE")
        } else {
            (s, 'S', "SECOND")
        }
    }

    /// `X-MBX-USED-WEIGHT-1M` and friends.
    pub(crate) fn header_name(self) -> String {
        let (n, letter, _) = self.interval();
        format!("x-mbx-used-weight-{n}{}", letter.to_ascii_lowercase())
    }
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Charged; `used` includes this request.
    Allowed { used: u32 },
    /// 429: over budget, not charged.
    Limited { used: u32, retry_after_s: u64 },
    /// 418: banned, not charged.
    Banned { used: u32, retry_after_s: u64 },
}

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    start: i64,
    used: u32,
    refused: u32,
}

#[derive(Debug)]
pub(crate) struct Limiter {
    budgets: HashMap<Market, Budget>,
    ban_ms: i64,
    windows: HashMap<(Market, IpAddr), Window>,
    bans: HashMap<(Market, IpAddr), i64>,
    /// Rolling mode: charges of the last window per (market, ip).
    rolling: Option<Charges>,
}

/// (arrival ms, weight) per (market, client IP).
type Charges = HashMap<(Market, IpAddr), VecDeque<(i64, u32)>>;

/// Refused requests tolerated in one window before the client is banned.
const REFUSALS_BEFORE_BAN: u32 = 2;

impl Limiter {
    pub(crate) fn new(budgets: HashMap<Market, Budget>, ban: Duration) -> Limiter {
        Limiter {
            budgets,
            ban_ms: duration_ms(ban),
            windows: HashMap::new(),
            bans: HashMap::new(),
            rolling: None,
        }
    }

    /// Counts weight over the last `window` at every request instead of per fixed window.
    pub(crate) fn set_rolling(&mut self, on: bool) {
        self.rolling = on.then(HashMap::new);
    }

    /// Rolling mode: the weight charged in `(now - window, now]`.
    fn rolling_used(&mut self, market: Market, ip: IpAddr, now: i64) -> Option<u32> {
        let len = self.budget(market).window_ms();
        let charges = self.rolling.as_mut()?.entry((market, ip)).or_default();
        while charges.front().is_some_and(|&(t, _)| t <= now - len) {
            charges.pop_front();
        }
        Some(charges.iter().map(|&(_, w)| w).sum())
    }

    pub(crate) fn budget(&self, market: Market) -> Budget {
        self.budgets
            .get(&market)
            .copied()
            .unwrap_or_else(|| default_budget(market))
    }

    pub(crate) fn set_budget(&mut self, market: Market, budget: Budget) {
        self.budgets.insert(market, budget);
        self.windows.retain(|(m, _), _| *m != market);
    }

    pub(crate) fn set_ban(&mut self, ban: Duration) {
        self.ban_ms = duration_ms(ban);
    }

    /// Bans `ip` on every market until `until` (ms), as Binance does after repeated 429s.
    pub(crate) fn ban_ip(&mut self, ip: IpAddr, until: i64) {
        for m in Market::ALL {
            self.bans.insert((m, ip), until);
        }
    }

    /// Lifts every ban and forgets this window's refusals.
    pub(crate) fn clear_bans(&mut self) {
        self.bans.clear();
        for w in self.windows.values_mut() {
            w.refused = 0;
        }
    }

    fn window(&mut self, market: Market, ip: IpAddr, now: i64) -> &mut Window {
        let len = self.budget(market).window_ms();
        let start = now.div_euclid(len) * len;
        let w = self.windows.entry((market, ip)).or_default();
        if w.start != start {
            *w = Window {
                start,
                ..Window::default()
            };
        }
        w
    }

    /// Weight used by `ip` on `market` in the current window.
    pub(crate) fn used(&mut self, market: Market, ip: IpAddr, now: i64) -> u32 {
        match self.rolling_used(market, ip, now) {
            Some(used) => used,
            None => self.window(market, ip, now).used,
        }
    }

    /// Admits and charges, refuses (429) or bans (418) one request of `weight`.
    pub(crate) fn admit(&mut self, market: Market, ip: IpAddr, weight: u32, now: i64) -> Admission {
        let budget = self.budget(market);
        let ban_ms = self.ban_ms;
        if let Some(&until) = self.bans.get(&(market, ip)) {
            if now < until {
                let used = self.used(market, ip, now);
                return Admission::Banned {
                    used,
                    retry_after_s: secs_until(now, until),
                };
            }
            self.bans.remove(&(market, ip));
        }
        let window_end = self.window(market, ip, now).start + budget.window_ms();
        let admitted = match self.rolling_used(market, ip, now) {
            Some(used) if used.saturating_add(weight) <= budget.limit => {
                if let Some(c) = self.rolling.as_mut().and_then(|r| r.get_mut(&(market, ip))) {
                    c.push_back((now, weight));
                }
                Some(used + weight)
            }
            Some(_) => None,
            None => {
                let w = self.window(market, ip, now);
                (w.used.saturating_add(weight) <= budget.limit).then(|| {
                    w.used += weight;
                    w.used
                })
            }
        };
        if let Some(used) = admitted {
            return Admission::Allowed { used };
        }
        // Refusals escalate per fixed window, whichever way weight is counted.
        let used = self.used(market, ip, now);
        let w = self.window(market, ip, now);
        w.refused += 1;
        if w.refused > REFUSALS_BEFORE_BAN {
            let until = now.saturating_add(ban_ms);
            self.bans.insert((market, ip), until);
            tracing::info!(%market, %ip, ban_ms, "Simulated IP ban after repeated 429s.");
            return Admission::Banned {
                used,
                retry_after_s: secs_until(now, until),
            };
        }
        Admission::Limited {
            used,
            retry_after_s: secs_until(now, window_end),
        }
    }
}

/// Binance's default budgets: spot 6000, um 2400, cm 2400 weight per minute.
pub(crate) fn default_budget(market: Market) -> Budget {
    let limit = match market {
        Market::Spot => 6000,
        Market::Um | Market::Cm => 2400,
    };
    Budget::new(limit, Duration::from_secs(60))
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whole seconds from `now` to `until`, rounded up, at least 1.
fn secs_until(now: i64, until: i64) -> u64 {
    let ms = until.saturating_sub(now).max(1);
    u64::try_from(ms.div_euclid(1000) + i64::from(ms % 1000 != 0)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolling_window_counts_the_last_window_span() {
        let mut budgets = HashMap::new();
        budgets.insert(Market::Um, Budget::new(4, Duration::from_secs(2)));
        let mut l = Limiter::new(budgets, Duration::from_secs(30));
        l.set_rolling(true);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t = 10_000; // a fixed-window boundary: fixed counting would reset at t + 2000
        assert_eq!(
            l.admit(Market::Um, ip, 2, t + 1500),
            Admission::Allowed { used: 2 }
        );
        assert_eq!(
            l.admit(Market::Um, ip, 2, t + 1900),
            Admission::Allowed { used: 4 }
        );
        // Past the fixed boundary, but both charges are still within the last 2 s.
        assert!(matches!(
            l.admit(Market::Um, ip, 2, t + 2100),
            Admission::Limited { .. }
        ));
        // The first charge has aged out.
        assert_eq!(
            l.admit(Market::Um, ip, 2, t + 3600),
            Admission::Allowed { used: 4 }
        );
    }

    #[test]
    fn escalates_429_then_418_and_resets_per_window() {
        let mut budgets = HashMap::new();
        budgets.insert(Market::Spot, Budget::new(4, Duration::from_secs(2)));
        let mut l = Limiter::new(budgets, Duration::from_secs(30));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t = 10_000;
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t),
            Admission::Allowed { used: 2 }
        );
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t),
            Admission::Allowed { used: 4 }
        );
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t + 500),
            Admission::Limited {
                used: 4,
                retry_after_s: 2
            }
        );
        // A new window resets.
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t + 2000),
            Admission::Allowed { used: 2 }
        );
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t + 2000),
            Admission::Allowed { used: 4 }
        );
        assert!(matches!(
            l.admit(Market::Spot, ip, 2, t + 2000),
            Admission::Limited { .. }
        ));
        assert!(matches!(
            l.admit(Market::Spot, ip, 2, t + 2000),
            Admission::Limited { .. }
        ));
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t + 2000),
            Admission::Banned {
                used: 4,
                retry_after_s: 30
            }
        );
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t + 12_500),
            Admission::Banned {
                used: 0,
                retry_after_s: 20
            }
        );
        assert_eq!(
            l.admit(Market::Spot, ip, 2, t + 32_000),
            Admission::Allowed { used: 2 }
        );
        assert_eq!(
            Budget::new(4, Duration::from_secs(2)).header_name(),
            "x-mbx-used-weight-2s"
        );
        assert_eq!(
            default_budget(Market::Um).header_name(),
            "x-mbx-used-weight-1m"
        );
    }

    /// Windows and bans driven by a manual clock: every boundary is stepped, none waited for.
    #[test]
    fn a_manual_clock_steps_windows_and_ends_bans() {
        use crate::clock::{ManualClock, SimClock};
        let mut budgets = HashMap::new();
        budgets.insert(Market::Spot, Budget::new(4, Duration::from_secs(60)));
        let mut l = Limiter::new(budgets, Duration::from_secs(30));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t = 1_700_000_040_000; // a minute boundary
        let manual = ManualClock::new(t);
        let clock = SimClock::Manual(manual.clone());
        let admit = |l: &mut Limiter| l.admit(Market::Spot, ip, 2, clock.now_ms());
        assert_eq!(admit(&mut l), Admission::Allowed { used: 2 });
        manual.advance(Duration::from_secs(59));
        assert_eq!(admit(&mut l), Admission::Allowed { used: 4 });
        assert_eq!(
            admit(&mut l),
            Admission::Limited {
                used: 4,
                retry_after_s: 1
            }
        );
        // The next window: the budget is back.
        manual.advance(Duration::from_secs(1));
        assert_eq!(admit(&mut l), Admission::Allowed { used: 2 });
        assert_eq!(admit(&mut l), Admission::Allowed { used: 4 });
        assert_eq!(
            admit(&mut l),
            Admission::Limited {
                used: 4,
                retry_after_s: 60
            }
        );
        assert!(matches!(admit(&mut l), Admission::Limited { .. }));
        assert_eq!(
            admit(&mut l),
            Admission::Banned {
                used: 4,
                retry_after_s: 30
            }
        );
        manual.advance(Duration::from_millis(29_999));
        assert_eq!(
            admit(&mut l),
            Admission::Banned {
                used: 4,
                retry_after_s: 1
            }
        );
        // The ban is over, but this window was already refused too often: the next refusal
        // bans again.
        manual.advance(Duration::from_millis(1));
        assert_eq!(
            admit(&mut l),
            Admission::Banned {
                used: 4,
                retry_after_s: 30
            }
        );
        manual.advance(Duration::from_secs(30));
        assert_eq!(admit(&mut l), Admission::Allowed { used: 2 });
        assert_eq!(l.used(Market::Spot, ip, clock.now_ms()), 2);
    }
}
