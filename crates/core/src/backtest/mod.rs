//! Backtests: strategies over a series of closed candles, with backtesting.py 0.6.6's exact
//! order execution, accounting and statistics.
//!
//! - [`Strategy`]: sees each closed candle with the values of the indicators it declared
//!   (the same [`Indicator`](crate::indicators::Indicator) code as the live service) and
//!   answers with an [`Action`]. Built-in ones in [`strategies`]; rule files in [`rules`].
//! - [`run`]: the broker (fills, commissions, sizing, stop-loss/take-profit) bar by bar, as
//!   backtesting.py's `_Broker` does it, then [`stats`] over the equity curve and the trades.

pub mod broker;
pub mod rules;
pub mod stats;
pub mod strategies;

pub use broker::{run, Fill, Options, Sizing};
pub use stats::Stats;

use crate::indicators::{Bar, Spec};

/// A series of closed candles, column by column (the layout the engine reads fastest).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Open time of each candle, Unix milliseconds (UTC), strictly increasing.
    pub time: Vec<i64>,
    pub open: Vec<f64>,
    pub high: Vec<f64>,
    pub low: Vec<f64>,
    pub close: Vec<f64>,
    pub volume: Vec<f64>,
    /// Zero when the source has none (backtesting.py-style CSVs).
    pub quote_volume: Vec<f64>,
}

impl Series {
    pub fn len(&self) -> usize {
        self.time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.time.is_empty()
    }

    pub fn push(&mut self, time: i64, b: &Bar) {
        self.time.push(time);
        self.open.push(b.open);
        self.high.push(b.high);
        self.low.push(b.low);
        self.close.push(b.close);
        self.volume.push(b.volume);
        self.quote_volume.push(b.quote_volume);
    }

    pub fn bar(&self, i: usize) -> Bar {
        Bar {
            open: self.open[i],
            high: self.high[i],
            low: self.low[i],
            close: self.close[i],
            volume: self.volume[i],
            quote_volume: self.quote_volume[i],
        }
    }

    /// Candles `from..to` (indices).
    pub fn slice(&self, from: usize, to: usize) -> Series {
        Series {
            time: self.time[from..to].to_vec(),
            open: self.open[from..to].to_vec(),
            high: self.high[from..to].to_vec(),
            low: self.low[from..to].to_vec(),
            close: self.close[from..to].to_vec(),
            volume: self.volume[from..to].to_vec(),
            quote_volume: self.quote_volume[from..to].to_vec(),
        }
    }
}

/// What a strategy wants after a candle closed (backtesting.py's `buy()`, `sell()` and
/// `position.close()`, with the run's sizing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Hold,
    /// A long market order (in exclusive mode, whatever is open is closed first).
    Buy,
    /// A short market order; with `long_only`, closes a long position instead.
    Sell,
    /// Closes every open trade.
    Close,
}

/// One closed candle as a strategy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candle<'a> {
    /// The candle's index in the series.
    pub index: usize,
    pub time: i64,
    pub bar: Bar,
    /// The declared indicators' outputs at this candle, then at the one before (NaN during
    /// their warm-up): spec by spec in declared order, each spec's outputs in
    /// [`Spec::outputs`] order.
    pub values: &'a [f64],
    pub prev: &'a [f64],
    /// The open position in units (> 0 long, < 0 short, 0 flat).
    pub position: f64,
}

/// A trading strategy. The engine feeds it every candle in order (so stateful strategies can
/// keep their own state); its actions are taken from the first candle at which every declared
/// indicator is defined, plus one (as backtesting.py skips its indicators' warm-up).
pub trait Strategy: Send {
    /// The indicators it reads, computed by the engine for [`Candle::values`].
    fn indicators(&self) -> Vec<Spec>;
    /// Extra candles of warm-up beyond the indicators' (rules with `prev(x, k)`).
    fn extra_warmup(&self) -> usize {
        0
    }
    fn on_candle(&mut self, candle: &Candle<'_>) -> Action;
    /// Stop-loss and take-profit as fractions of the entry price (0.05 = 5 %), if any.
    fn stops(&self) -> (Option<f64>, Option<f64>) {
        (None, None)
    }
}

/// One closed trade (or the open one at the end, marked to market, when asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct Trade {
    /// Units; negative for a short.
    pub size: f64,
    pub entry_bar: usize,
    pub exit_bar: usize,
    pub entry_time: i64,
    pub exit_time: i64,
    pub entry_price: f64,
    pub exit_price: f64,
    /// Profit or loss in cash, commissions included.
    pub pnl: f64,
    /// As backtesting.py's `ReturnPct`: a fraction (0.05 = 5 %), commissions included.
    pub return_pct: f64,
    pub commission: f64,
    pub sl: Option<f64>,
    pub tp: Option<f64>,
}

/// A finished backtest: the trades, the equity curve (one value per candle) and the statistics.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub trades: Vec<Trade>,
    pub equity: Vec<f64>,
    pub stats: Stats,
    /// Trades still open at the end (not in the statistics, as backtesting.py).
    pub open_trades: usize,
    /// The first candle the strategy could act on.
    pub start: usize,
}
