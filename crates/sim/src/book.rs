//! Which candles exist: listings, CSV series, maintenance gaps and the open candle. Owns the
//! range walks behind REST klines and archive files; owns no I/O and no HTTP.

use std::collections::BTreeMap;
use std::path::Path;

use qs_core::market::{month_start, Kline, Market, PairKey, Period, Source, Symbol};

use super::synthetic;

/// A real klines series loaded from a CSV file (12 columns, optional header).
#[derive(Debug, Clone)]
pub(crate) struct Series {
    rows: BTreeMap<i64, Kline>,
    first: i64,
    last: i64,
}

impl Series {
    pub(crate) fn load(pair: &PairKey, path: &Path) -> std::io::Result<Series> {
        let bad = |line: usize, why: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}:{line}: {why}", path.display()),
            )
        };
        let text = std::fs::read_to_string(path)?;
        let mut rows = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            let numeric = fields
                .first()
                .is_some_and(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
            if i == 0 && !numeric {
                continue; // header row
            }
            let k = Kline::from_fields(pair.clone(), &fields, true, Source::Rest)
                .map_err(|e| bad(i + 1, e))?;
            rows.insert(k.open_time, k);
        }
        let (Some(first), Some(last)) = (rows.keys().next().copied(), rows.keys().last().copied())
        else {
            return Err(bad(0, "no kline rows".to_string()));
        };
        Ok(Series { rows, first, last })
    }

    pub(crate) fn first(&self) -> i64 {
        self.first
    }
}

/// A maintenance window: no candle lies entirely inside `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maintenance {
    pub market: Market,
    /// `None` = every symbol of the market.
    pub symbol: Option<Symbol>,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Everything needed to answer "which candles of this pair exist", captured for one request.
pub(crate) struct PairView<'a> {
    pub pair: &'a PairKey,
    /// Open time of the first candle (the one containing the listing time).
    pub first_open: i64,
    pub series: Option<&'a Series>,
    /// Maintenance windows that apply to this pair.
    pub gaps: Vec<(i64, i64)>,
}

impl<'a> PairView<'a> {
    pub(crate) fn new(
        pair: &'a PairKey,
        listed_ms: i64,
        series: Option<&'a Series>,
        maintenance: &[Maintenance],
    ) -> PairView<'a> {
        let first_open = match series {
            Some(s) => s.first(),
            None => pair.period.align(listed_ms),
        };
        let gaps = maintenance
            .iter()
            .filter(|m| {
                m.market == pair.market && m.symbol.as_ref().is_none_or(|s| *s == pair.symbol)
            })
            .map(|m| (m.start_ms, m.end_ms))
            .collect();
        PairView {
            pair,
            first_open,
            series,
            gaps,
        }
    }

    fn period(&self) -> Period {
        self.pair.period
    }

    /// The maintenance window that swallows the whole candle at `open`, if any.
    fn gap_covering(&self, open: i64) -> Option<(i64, i64)> {
        let next = self.period().next_open(open);
        self.gaps
            .iter()
            .copied()
            .find(|&(s, e)| open >= s && next <= e)
    }

    /// The final candle at `open` regardless of the clock, or `None` if it does not exist.
    fn final_at(&self, open: i64) -> Option<Kline> {
        if open < self.first_open || self.gap_covering(open).is_some() {
            return None;
        }
        match self.series {
            Some(s) if open <= s.last => s.rows.get(&open).cloned(),
            _ => Some(synthetic::candle(self.pair, open)),
        }
    }

    /// The candle at `open` as seen at `now`: `None` if it does not exist yet, the in-progress
    /// version if `now` is inside it, else the final one.
    pub(crate) fn at(&self, open: i64, now: i64) -> Option<Kline> {
        if open > now {
            return None;
        }
        let k = self.final_at(open)?;
        if now <= k.close_time {
            Some(synthetic::partial_of(&k, now))
        } else {
            Some(k)
        }
    }

    /// The first grid open time `>= t`.
    fn ceil_grid(&self, t: i64) -> i64 {
        let a = self.period().align(t);
        if a >= t {
            a
        } else {
            self.period().next_open(a)
        }
    }

    fn prev_open(&self, open: i64) -> i64 {
        match self.period().fixed_ms() {
            Some(len) => open.saturating_sub(len),
            None => month_start(open - 1),
        }
    }

    /// Up to `limit` candles with `lo <= open_time <= hi` (and `<= now`), oldest first.
    pub(crate) fn forward(&self, lo: i64, hi: i64, limit: usize, now: i64) -> Vec<Kline> {
        let mut out = Vec::new();
        let hi = hi.min(now);
        let mut open = self.ceil_grid(lo.max(self.first_open));
        while open <= hi && out.len() < limit {
            if let Some((_, end)) = self.gap_covering(open) {
                // Jump to the candle containing the gap's last millisecond.
                open = self
                    .period()
                    .next_open(open)
                    .max(self.period().align(end - 1));
                continue;
            }
            if let Some(s) = self.series {
                if open <= s.last && !s.rows.contains_key(&open) {
                    match s.rows.range(open..).next() {
                        Some((&next, _)) => {
                            open = next;
                            continue;
                        }
                        None => {
                            open = self.ceil_grid(s.last + 1);
                            continue;
                        }
                    }
                }
            }
            if let Some(k) = self.at(open, now) {
                out.push(k);
            }
            open = self.period().next_open(open);
        }
        out
    }

    /// The most recent `limit` candles with `lo <= open_time <= hi` (and `<= now`), returned
    /// oldest first.
    pub(crate) fn backward(&self, lo: i64, hi: i64, limit: usize, now: i64) -> Vec<Kline> {
        let mut out = Vec::new();
        let lo = lo.max(self.first_open);
        let mut open = self.period().align(hi.min(now));
        while open >= lo && out.len() < limit {
            if let Some((start, _)) = self.gap_covering(open) {
                open = self.prev_open(open).min(self.period().align(start - 1));
                continue;
            }
            if let Some(s) = self.series {
                if open <= s.last && !s.rows.contains_key(&open) {
                    match s.rows.range(..open).next_back() {
                        Some((&prev, _)) => open = prev,
                        None => break,
                    }
                    continue;
                }
            }
            if let Some(k) = self.at(open, now) {
                out.push(k);
            }
            open = self.prev_open(open);
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_listing_bound_the_walks() {
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let listed = 1_700_000_000_000 - 1_700_000_000_000 % 60_000;
        let gap = Maintenance {
            market: Market::Um,
            symbol: None,
            start_ms: listed + 5 * 60_000,
            end_ms: listed + 10 * 60_000,
        };
        let view = PairView::new(&pair, listed, None, std::slice::from_ref(&gap));
        let now = listed + 3_600_000;
        let fwd = view.forward(0, i64::MAX, 8, now);
        let opens: Vec<i64> = fwd
            .iter()
            .map(|k| (k.open_time - listed) / 60_000)
            .collect();
        assert_eq!(opens, vec![0, 1, 2, 3, 4, 10, 11, 12]);
        let back = view.backward(listed, listed + 11 * 60_000, 8, now);
        let opens: Vec<i64> = back
            .iter()
            .map(|k| (k.open_time - listed) / 60_000)
            .collect();
        assert_eq!(opens, vec![0, 1, 2, 3, 4, 10, 11]);
        // The open candle is partial.
        let last = view.backward(0, i64::MAX, 1, now + 30_000);
        assert_eq!(last.len(), 1);
        assert!(!last[0].is_final);
    }
}
