//! The broker and the bar loop: backtesting.py 0.6.6's `_Broker` and `Backtest.run`, ported
//! for market orders, `Trade.close()` orders and stop-loss/take-profit (contingent) orders,
//! in the same order of operations so every fill, size, cash and equity value is the same
//! `f64` backtesting.py computes.
//!
//! The loop, per candle `i` from the first one after the indicators' warm-up:
//! 1. the broker processes the waiting orders against candle `i` (market orders fill at its
//!    open, or with `Fill::Close` at candle `i - 1`'s close, as `trade_on_close=True`), then
//!    records the equity at candle `i`'s close;
//! 2. the strategy sees candle `i` closed and may place orders.

use super::{stats, Action, Candle, Outcome, Series, Strategy, Trade};
use crate::indicators::{self, Bar, Spec};

/// How big an order is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sizing {
    /// backtesting.py's default: all available equity, in whole units at the fill price
    /// including commission.
    Whole,
    /// All available equity, the quantity rounded down to a multiple of `step` (crypto).
    Fraction { step: f64 },
    /// A fixed quantity in units.
    Fixed(f64),
}

/// Where market orders fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// At the next candle's open (backtesting.py's default).
    NextOpen,
    /// At the deciding candle's close (`trade_on_close=True`).
    Close,
}

/// A run's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub cash: f64,
    /// A fraction of the notional, charged on entry and on exit.
    pub commission: f64,
    /// Slippage as a fraction of the price (backtesting.py's `spread`): buys fill that much
    /// higher, sells that much lower.
    pub spread: f64,
    pub sizing: Sizing,
    pub fill: Fill,
    /// A new order closes whatever is open first (`exclusive_orders=True`).
    pub exclusive: bool,
    /// Sell signals only close long positions.
    pub long_only: bool,
    /// Close the trades still open at the end (`finalize_trades=True`).
    pub finalize: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cash: 10_000.0,
            commission: 0.0,
            spread: 0.0,
            sizing: Sizing::Whole,
            fill: Fill::NextOpen,
            exclusive: false,
            long_only: false,
            finalize: false,
        }
    }
}

/// Why options are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionsError {
    #[error("cash must be a positive number, not {0}")]
    Cash(f64),
    #[error("commission must be between -0.1 and 0.1 (a fraction of the notional), not {0}")]
    Commission(f64),
    #[error("slippage must be between 0 and 0.1 (a fraction of the price), not {0}")]
    Spread(f64),
    #[error("a fixed quantity must be a positive number, not {0}")]
    Quantity(f64),
    #[error("the step size must be a positive number, not {0}")]
    Step(f64),
}

impl Options {
    pub fn check(&self) -> Result<(), OptionsError> {
        if !(self.cash > 0.0 && self.cash.is_finite()) {
            return Err(OptionsError::Cash(self.cash));
        }
        if !(-0.1..0.1).contains(&self.commission) {
            return Err(OptionsError::Commission(self.commission));
        }
        if !(0.0..0.1).contains(&self.spread) {
            return Err(OptionsError::Spread(self.spread));
        }
        match self.sizing {
            Sizing::Fixed(q) if !(q > 0.0 && q.is_finite()) => Err(OptionsError::Quantity(q)),
            Sizing::Fraction { step } if !(step > 0.0 && step.is_finite()) => {
                Err(OptionsError::Step(step))
            }
            _ => Ok(()),
        }
    }
}

/// backtesting.py's default order size: all of the equity (`1 - ε`).
const FULL: f64 = 1.0 - f64::EPSILON;

/// Python's float floor division `a // b`.
fn py_floordiv(a: f64, b: f64) -> f64 {
    let mut m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        m += b;
        div -= 1.0;
    }
    let _ = m;
    if div != 0.0 {
        let mut f = div.floor();
        if div - f > 0.5 {
            f += 1.0;
        }
        f
    } else {
        (0.0f64).copysign(a / b)
    }
}

#[derive(Debug, Clone)]
struct Order {
    id: u64,
    /// Units, or with [`Order::relative`] a fraction of the equity; negative = sell.
    size: f64,
    relative: bool,
    stop: Option<f64>,
    limit: Option<f64>,
    /// The trade a close, stop-loss or take-profit order belongs to.
    parent: Option<u64>,
}

#[derive(Debug, Clone)]
struct Open {
    id: u64,
    size: f64,
    entry_price: f64,
    entry_bar: usize,
    sl_order: Option<u64>,
    tp_order: Option<u64>,
    sl: Option<f64>,
    tp: Option<f64>,
}

struct Broker<'a> {
    o: &'a Options,
    s: &'a Series,
    stops: (Option<f64>, Option<f64>),
    cash: f64,
    orders: Vec<Order>,
    trades: Vec<Open>,
    closed: Vec<Trade>,
    equity: Vec<f64>,
    next_id: u64,
    /// The candle being processed.
    i: usize,
}

impl Broker<'_> {
    fn commission(&self, size: f64, price: f64) -> f64 {
        0.0 + size.abs() * price * self.o.commission
    }

    fn last_price(&self) -> f64 {
        self.s.close[self.i]
    }

    fn position(&self) -> f64 {
        self.trades.iter().fold(0.0, |a, t| a + t.size)
    }

    fn equity_now(&self) -> f64 {
        let entry = self
            .trades
            .iter()
            .fold(0.0, |a, t| a + t.size * t.entry_price);
        self.cash + (self.last_price() * self.position() - entry)
    }

    fn margin_available(&self) -> f64 {
        let lp = self.last_price();
        let used = self.trades.iter().fold(0.0, |a, t| a + t.size.abs() * lp);
        (self.equity_now() - used).max(0.0)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn is_contingent(&self, o: &Order) -> bool {
        o.parent.is_some_and(|p| {
            self.trades
                .iter()
                .any(|t| t.id == p && (t.sl_order == Some(o.id) || t.tp_order == Some(o.id)))
        })
    }

    fn remove_order(&mut self, id: u64) {
        if let Some(k) = self.orders.iter().position(|o| o.id == id) {
            self.orders.remove(k);
        }
    }

    /// `Trade.close()`: a market order for the whole trade, first in the queue.
    fn close_order(&mut self, t: usize) {
        let (size, parent) = (-self.trades[t].size, self.trades[t].id);
        let id = self.id();
        self.orders.insert(
            0,
            Order {
                id,
                size,
                relative: false,
                stop: None,
                limit: None,
                parent: Some(parent),
            },
        );
    }

    /// `Position.close()`: a close order for every open trade.
    fn close_all(&mut self) {
        for t in 0..self.trades.len() {
            self.close_order(t);
        }
    }

    /// `Strategy.buy()`/`sell()` with the run's sizing.
    fn new_order(&mut self, long: bool) {
        let (size, relative) = match self.o.sizing {
            Sizing::Whole | Sizing::Fraction { .. } => (FULL, true),
            Sizing::Fixed(q) => (q, false),
        };
        let size = if long { size } else { -size };
        if self.o.exclusive {
            let keep: Vec<bool> = self.orders.iter().map(|o| self.is_contingent(o)).collect();
            let mut k = 0;
            self.orders.retain(|_| {
                k += 1;
                keep[k - 1]
            });
            self.close_all();
        }
        let id = self.id();
        self.orders.push(Order {
            id,
            size,
            relative,
            stop: None,
            limit: None,
            parent: None,
        });
    }

    fn process_orders(&mut self) {
        let i = self.i;
        let (open, high, low) = (self.s.open[i], self.s.high[i], self.s.low[i]);
        let on_close = self.o.fill == Fill::Close;
        let mut reprocess = false;
        let ids: Vec<u64> = self.orders.iter().map(|o| o.id).collect();
        for oid in ids {
            let Some(k) = self.orders.iter().position(|o| o.id == oid) else {
                continue;
            };
            let order = self.orders[k].clone();
            let long = order.size > 0.0;
            let stop_price = order.stop;
            if let Some(sp) = stop_price {
                let hit = if long { high >= sp } else { low <= sp };
                if !hit {
                    continue;
                }
                self.orders[k].stop = None;
            }
            let contingent = self.is_contingent(&order);
            let price = if let Some(limit) = order.limit {
                let hit = if long { low <= limit } else { high >= limit };
                let before_stop = hit
                    && if long {
                        limit <= stop_price.unwrap_or(f64::NEG_INFINITY)
                    } else {
                        limit >= stop_price.unwrap_or(f64::INFINITY)
                    };
                if !hit || before_stop {
                    continue;
                }
                let sp = stop_price.unwrap_or(open);
                if long {
                    sp.min(limit)
                } else {
                    sp.max(limit)
                }
            } else {
                let p = if on_close && !contingent && i > 0 {
                    self.s.close[i - 1]
                } else {
                    open
                };
                match stop_price {
                    Some(sp) if long => p.max(sp),
                    Some(sp) => p.min(sp),
                    None => p,
                }
            };
            let is_market = order.limit.is_none() && stop_price.is_none();
            let at = if is_market && on_close && !contingent && i > 0 {
                i - 1
            } else {
                i
            };
            if let Some(parent) = order.parent {
                if let Some(t) = self.trades.iter().position(|t| t.id == parent) {
                    let prev = self.trades[t].size;
                    let size = prev.abs().min(order.size.abs()).copysign(order.size);
                    self.reduce_trade(t, price, size, at);
                }
                // A stop-loss/take-profit order left with its trade; a close order is done.
                self.remove_order(oid);
                continue;
            }
            // A stand-alone order.
            let adjusted = price * (1.0 + self.o.spread.copysign(order.size));
            let app = adjusted + self.commission(order.size, price) / order.size.abs();
            let mut size = order.size;
            if order.relative {
                let budget = self.margin_available() * size.abs();
                let units = match self.o.sizing {
                    Sizing::Fraction { step } => ((budget / app) / step).floor() * step,
                    _ => py_floordiv(budget, app),
                };
                size = units.copysign(size);
                if units == 0.0 || !units.is_finite() {
                    self.remove_order(oid);
                    continue;
                }
            }
            let mut need = size;
            // No hedging: opposite trades are closed (or reduced) first, oldest first.
            let mut t = 0;
            while t < self.trades.len() {
                let ts = self.trades[t].size;
                if (ts > 0.0) == long {
                    t += 1;
                    continue;
                }
                if need.abs() >= ts.abs() {
                    self.close_trade(t, price, at);
                    need += ts;
                } else {
                    self.reduce_trade(t, price, need, at);
                    need = 0.0;
                }
                if need == 0.0 {
                    break;
                }
            }
            if need.abs() * app > self.margin_available() {
                self.remove_order(oid);
                continue;
            }
            if need != 0.0 {
                let has_stops = self.open_trade(adjusted, need, at);
                if has_stops && is_market {
                    reprocess = true;
                }
            }
            self.remove_order(oid);
        }
        if reprocess {
            self.process_orders();
        }
    }

    fn reduce_trade(&mut self, t: usize, price: f64, size: f64, at: usize) {
        let left = self.trades[t].size + size;
        if left == 0.0 {
            self.close_trade(t, price, at);
            return;
        }
        self.trades[t].size = left;
        let mut part = self.trades[t].clone();
        part.id = self.id();
        part.size = -size;
        part.sl_order = None;
        part.tp_order = None;
        for oid in [self.trades[t].sl_order, self.trades[t].tp_order]
            .into_iter()
            .flatten()
        {
            if let Some(o) = self.orders.iter_mut().find(|o| o.id == oid) {
                o.size = -left;
            }
        }
        self.trades.push(part);
        let last = self.trades.len() - 1;
        self.close_trade(last, price, at);
    }

    fn close_trade(&mut self, t: usize, price: f64, at: usize) {
        let tr = self.trades.remove(t);
        for oid in [tr.sl_order, tr.tp_order].into_iter().flatten() {
            self.remove_order(oid);
        }
        let exit_commission = self.commission(tr.size, price);
        let gross = tr.size * (price - tr.entry_price);
        self.cash += gross - exit_commission;
        let commission = exit_commission + self.commission(tr.size, tr.entry_price);
        let pnl = tr.size * (price - tr.entry_price) - commission;
        let return_pct = 1.0f64.copysign(tr.size) * (price / tr.entry_price - 1.0)
            - commission / (tr.size.abs() * tr.entry_price);
        self.closed.push(Trade {
            size: tr.size,
            entry_bar: tr.entry_bar,
            exit_bar: at,
            entry_time: self.s.time[tr.entry_bar],
            exit_time: self.s.time[at],
            entry_price: tr.entry_price,
            exit_price: price,
            pnl,
            return_pct,
            commission,
            sl: tr.sl,
            tp: tr.tp,
        });
    }

    /// Opens a trade; true if it got stop-loss/take-profit orders.
    fn open_trade(&mut self, price: f64, size: f64, at: usize) -> bool {
        let id = self.id();
        self.cash -= self.commission(size, price);
        let (sl_pct, tp_pct) = self.stops;
        let sign = if size > 0.0 { 1.0 } else { -1.0 };
        let sl = sl_pct.map(|p| price * (1.0 - sign * p));
        let tp = tp_pct.map(|p| price * (1.0 + sign * p));
        let mut trade = Open {
            id,
            size,
            entry_price: price,
            entry_bar: at,
            sl_order: None,
            tp_order: None,
            sl,
            tp,
        };
        if let Some(tp) = tp {
            let oid = self.id();
            self.orders.push(Order {
                id: oid,
                size: -size,
                relative: false,
                stop: None,
                limit: Some(tp),
                parent: Some(id),
            });
            trade.tp_order = Some(oid);
        }
        if let Some(sl) = sl {
            let oid = self.id();
            self.orders.insert(
                0,
                Order {
                    id: oid,
                    size: -size,
                    relative: false,
                    stop: Some(sl),
                    limit: None,
                    parent: Some(id),
                },
            );
            trade.sl_order = Some(oid);
        }
        self.trades.push(trade);
        sl.is_some() || tp.is_some()
    }

    /// Processes candle `i`'s orders and records its equity; false when the money ran out.
    fn next(&mut self, i: usize) -> bool {
        self.i = i;
        self.process_orders();
        let equity = self.equity_now();
        self.equity[i] = equity;
        if equity <= 0.0 {
            // As backtesting.py (whose loop skips every other trade while removing them).
            let mut k = 0;
            while k < self.trades.len() {
                let p = self.last_price();
                self.close_trade(k, p, i);
                k += 1;
            }
            self.cash = 0.0;
            for e in &mut self.equity[i..] {
                *e = 0.0;
            }
            return false;
        }
        true
    }
}

/// The first candle each indicator is defined at, the slowest of them (backtesting.py's
/// warm-up: 0 if one is never defined).
fn warmup(specs: &[Spec], n: usize) -> usize {
    specs
        .iter()
        .map(|s| if s.lookback() < n { s.lookback() } else { 0 })
        .max()
        .unwrap_or(0)
}

/// The declared indicators' outputs, candle by candle: `k` values per candle.
fn indicator_rows(specs: &[Spec], s: &Series) -> (Vec<f64>, usize) {
    let k: usize = specs.iter().map(|s| s.outputs().len()).sum();
    let n = s.len();
    let mut rows = vec![f64::NAN; n * k];
    let mut bars: Option<Vec<Bar>> = None;
    let mut col = 0;
    for spec in specs {
        let mut cols = Vec::new();
        if !indicators::batch_closes_into(spec, &s.close, &mut cols) {
            let bars = bars.get_or_insert_with(|| (0..n).map(|i| s.bar(i)).collect());
            cols = indicators::batch(spec, bars);
        }
        for c in &cols {
            for (i, v) in c.iter().enumerate() {
                rows[i * k + col] = *v;
            }
            col += 1;
        }
    }
    (rows, k)
}

/// Runs `strategy` over `series`.
pub fn run(strategy: &mut dyn Strategy, series: &Series, o: &Options) -> Outcome {
    let n = series.len();
    let specs = strategy.indicators();
    let (rows, k) = indicator_rows(&specs, series);
    // A warm-up as long as the series counts as none (backtesting.py's argmin of all-NaN).
    let extra = strategy.extra_warmup();
    let warm = warmup(&specs, n) + if extra < n { extra } else { 0 };
    let start = 1 + warm;
    let mut b = Broker {
        o,
        s: series,
        stops: strategy.stops(),
        cash: o.cash,
        orders: Vec::new(),
        trades: Vec::new(),
        closed: Vec::new(),
        equity: vec![f64::NAN; n],
        next_id: 0,
        i: 0,
    };
    let empty: [f64; 0] = [];
    let mut completed = true;
    for i in 0..n {
        if i >= start && !b.next(i) {
            completed = false;
            break;
        }
        let values = if k == 0 {
            &empty[..]
        } else {
            &rows[i * k..(i + 1) * k]
        };
        let prev = if k == 0 || i == 0 {
            &empty[..]
        } else {
            &rows[(i - 1) * k..i * k]
        };
        let action = strategy.on_candle(&Candle {
            index: i,
            time: series.time[i],
            bar: series.bar(i),
            values,
            prev,
            position: b.position(),
        });
        if i < start {
            continue;
        }
        match action {
            Action::Hold => {}
            Action::Buy => b.new_order(true),
            Action::Sell if o.long_only => {
                if b.position() > 0.0 {
                    b.close_all();
                }
            }
            Action::Sell => b.new_order(false),
            Action::Close => b.close_all(),
        }
    }
    if completed && o.finalize {
        for t in (0..b.trades.len()).rev() {
            b.close_order(t);
        }
        if start < n {
            b.next(n - 1);
        }
    }
    // Before the first traded candle: the first recorded equity (bfill), else the cash.
    let mut fill = b.cash;
    for e in b.equity.iter_mut().rev() {
        if e.is_nan() {
            *e = fill;
        } else {
            fill = *e;
        }
    }
    let stats = stats::compute(
        &b.closed,
        &b.equity,
        &series.time,
        &series.close,
        warm.min(n.saturating_sub(1)),
    );
    Outcome {
        open_trades: b.trades.len(),
        trades: b.closed,
        equity: b.equity,
        stats,
        start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backtest::{Action, Candle, Strategy};

    /// Buys at candle 1, sells at candle 3 (long only: closes).
    struct Once;
    impl Strategy for Once {
        fn indicators(&self) -> Vec<Spec> {
            Vec::new()
        }
        fn on_candle(&mut self, c: &Candle<'_>) -> Action {
            match c.index {
                1 => Action::Buy,
                3 => Action::Sell,
                _ => Action::Hold,
            }
        }
    }

    fn series(prices: &[f64]) -> Series {
        let mut s = Series::default();
        for (i, &p) in prices.iter().enumerate() {
            s.push(i as i64 * 60_000, &Bar::from_close(p));
        }
        s
    }

    #[test]
    fn fraction_sizing_rounds_down_to_the_step_and_fixed_buys_that_many_units() {
        let s = series(&[30_000.0, 30_000.0, 30_000.0, 31_000.0, 31_000.0, 31_000.0]);
        let mut o = Options {
            cash: 10_000.0,
            commission: 0.001,
            long_only: true,
            sizing: Sizing::Fraction { step: 0.00001 },
            ..Options::default()
        };
        let out = run(&mut Once, &s, &o);
        assert_eq!(out.trades.len(), 1);
        let t = &out.trades[0];
        // 10,000 / (30,000 · 1.001) = 0.333000333.. → 0.33300 in steps of 0.00001.
        assert!((t.size - 0.333).abs() < 1e-12, "{}", t.size);
        assert_eq!((t.size / 0.00001).round() * 0.00001, t.size);
        assert_eq!((t.entry_bar, t.exit_bar), (2, 4));
        assert_eq!((t.entry_price, t.exit_price), (30_000.0, 31_000.0));
        let fees = t.size * 30_000.0 * 0.001 + t.size * 31_000.0 * 0.001;
        assert!((t.pnl - (t.size * 1_000.0 - fees)).abs() < 1e-9);
        // Whole units: none affordable, so the broker cancels the order.
        o.sizing = Sizing::Whole;
        assert!(run(&mut Once, &s, &o).trades.is_empty());
        o.sizing = Sizing::Fixed(0.25);
        let out = run(&mut Once, &s, &o);
        assert_eq!(out.trades[0].size, 0.25);
        // More than the cash allows: cancelled, not a negative balance.
        o.sizing = Sizing::Fixed(1.0);
        assert!(run(&mut Once, &s, &o).trades.is_empty());
        assert_eq!(run(&mut Once, &s, &o).stats.equity_final, 10_000.0);
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(py_floordiv(7.0, 2.0), 3.0);
        assert_eq!(py_floordiv(-7.0, 2.0), -4.0);
        assert_eq!(py_floordiv(9999.999999999998, 100.2), 99.0);
        assert_eq!(py_floordiv(0.0, 3.0), 0.0);
    }

    #[test]
    fn options_are_checked() {
        let ok = Options::default();
        assert!(ok.check().is_ok());
        for bad in [
            Options {
                cash: 0.0,
                ..ok.clone()
            },
            Options {
                commission: 0.2,
                ..ok.clone()
            },
            Options {
                spread: -0.1,
                ..ok.clone()
            },
            Options {
                sizing: Sizing::Fixed(0.0),
                ..ok.clone()
            },
            Options {
                sizing: Sizing::Fraction { step: f64::NAN },
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
