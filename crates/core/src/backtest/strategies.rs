//! The built-in strategies. Each trades on events, as backtesting.py's Quick Start
//! `SmaCross` does (`crossover(a, b)`: `a` was below `b` at the previous candle and is above
//! it now), and reads its indicators through the engine (the live service's code).
//!
//! | name | parameters (defaults) | buys when | sells when |
//! |---|---|---|---|
//! | `sma_cross` | `fast=10, slow=20` | `sma(fast)` crosses above `sma(slow)` | it crosses below |
//! | `ema_cross` | `fast=10, slow=20` | `ema(fast)` crosses above `ema(slow)` | it crosses below |
//! | `rsi_reversion` | `n=14, low=30, high=70` | `rsi(n)` crosses below `low` | it crosses above `high` |
//! | `macd_cross` | `fast=12, slow=26, signal=9` | the MACD line crosses above its signal | below |
//! | `bbands_breakout` | `n=20, k=2` | the close crosses above the upper band of `bbands(n,k,k)` | below the lower band |
//! | `donchian_breakout` | `n=20` | the close is above the previous candle's `donchian(n)` upper line (not long) | below its lower line (not short) |

use super::{Action, Candle, Strategy};
use crate::indicators::Spec;

/// Why a strategy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    #[error("unknown strategy {0:?} (built-in: {known})", known = NAMES.join(", "))]
    Unknown(String),
    #[error("{strategy} has no parameter {param:?} (it takes: {takes})")]
    UnknownParam {
        strategy: String,
        param: String,
        takes: String,
    },
    #[error("{strategy}: {message}")]
    Invalid { strategy: String, message: String },
}

/// The built-in strategies' names.
pub const NAMES: [&str; 6] = [
    "sma_cross",
    "ema_cross",
    "rsi_reversion",
    "macd_cross",
    "bbands_breakout",
    "donchian_breakout",
];

/// A built-in strategy's parameters and their defaults.
pub fn params(name: &str) -> Option<&'static [(&'static str, f64)]> {
    Some(match name {
        "sma_cross" | "ema_cross" => &[("fast", 10.0), ("slow", 20.0)],
        "rsi_reversion" => &[("n", 14.0), ("low", 30.0), ("high", 70.0)],
        "macd_cross" => &[("fast", 12.0), ("slow", 26.0), ("signal", 9.0)],
        "bbands_breakout" => &[("n", 20.0), ("k", 2.0)],
        "donchian_breakout" => &[("n", 20.0)],
        _ => return None,
    })
}

/// Builds `name` with `given` parameters (the others at their defaults).
pub fn build(name: &str, given: &[(String, f64)]) -> Result<Box<dyn Strategy>, StrategyError> {
    let defaults = params(name).ok_or_else(|| StrategyError::Unknown(name.to_string()))?;
    let mut v: Vec<f64> = defaults.iter().map(|d| d.1).collect();
    for (k, x) in given {
        let Some(i) = defaults.iter().position(|d| d.0 == k) else {
            return Err(StrategyError::UnknownParam {
                strategy: name.to_string(),
                param: k.clone(),
                takes: defaults.iter().map(|d| d.0).collect::<Vec<_>>().join(", "),
            });
        };
        v[i] = *x;
    }
    let invalid = |message: String| StrategyError::Invalid {
        strategy: name.to_string(),
        message,
    };
    let int = |i: usize| -> Result<u32, StrategyError> {
        let x = v[i];
        if x.fract() != 0.0 || !(1.0..=100_000.0).contains(&x) {
            return Err(invalid(format!(
                "{} must be a whole number of candles from 1 to 100000, not {x}",
                defaults[i].0
            )));
        }
        Ok(x as u32)
    };
    let spec = |s: String| Spec::parse(&s).map_err(|e| invalid(e.to_string()));
    Ok(match name {
        "sma_cross" | "ema_cross" => {
            let (fast, slow) = (int(0)?, int(1)?);
            if fast >= slow {
                return Err(invalid(format!(
                    "fast ({fast}) must be less than slow ({slow})"
                )));
            }
            let kind = &name[..3];
            Box::new(Cross {
                specs: vec![
                    spec(format!("{kind}({fast})"))?,
                    spec(format!("{kind}({slow})"))?,
                ],
                a: 0,
                b: 1,
            })
        }
        "macd_cross" => {
            let (fast, slow, signal) = (int(0)?, int(1)?, int(2)?);
            Box::new(Cross {
                specs: vec![spec(format!("macd({fast},{slow},{signal})"))?],
                a: 0,
                b: 1,
            })
        }
        "rsi_reversion" => {
            let n = int(0)?;
            let (low, high) = (v[1], v[2]);
            if !(0.0 < low && low < high && high < 100.0) {
                return Err(invalid(format!(
                    "need 0 < low < high < 100 (low={low}, high={high})"
                )));
            }
            Box::new(RsiReversion {
                specs: vec![spec(format!("rsi({n})"))?],
                low,
                high,
            })
        }
        "bbands_breakout" => {
            let n = int(0)?;
            let k = v[1];
            Box::new(Bands {
                specs: vec![spec(format!("bbands({n},{k},{k})"))?],
                prev_close: f64::NAN,
            })
        }
        "donchian_breakout" => {
            let n = int(0)?;
            Box::new(Donchian {
                specs: vec![spec(format!("donchian({n})"))?],
            })
        }
        _ => return Err(StrategyError::Unknown(name.to_string())),
    })
}

/// backtesting.py's `crossover`: `a` was below `b` and is above it now.
pub fn crossover(a_prev: f64, b_prev: f64, a: f64, b: f64) -> bool {
    a_prev < b_prev && a > b
}

/// Two lines crossing: values `a` and `b` of the candle's indicator outputs.
struct Cross {
    specs: Vec<Spec>,
    a: usize,
    b: usize,
}

impl Strategy for Cross {
    fn indicators(&self) -> Vec<Spec> {
        self.specs.clone()
    }
    fn on_candle(&mut self, c: &Candle<'_>) -> Action {
        if c.prev.is_empty() {
            return Action::Hold;
        }
        let (a, b, ap, bp) = (
            c.values[self.a],
            c.values[self.b],
            c.prev[self.a],
            c.prev[self.b],
        );
        if crossover(ap, bp, a, b) {
            Action::Buy
        } else if crossover(bp, ap, b, a) {
            Action::Sell
        } else {
            Action::Hold
        }
    }
}

struct RsiReversion {
    specs: Vec<Spec>,
    low: f64,
    high: f64,
}

impl Strategy for RsiReversion {
    fn indicators(&self) -> Vec<Spec> {
        self.specs.clone()
    }
    fn on_candle(&mut self, c: &Candle<'_>) -> Action {
        if c.prev.is_empty() {
            return Action::Hold;
        }
        let (r, rp) = (c.values[0], c.prev[0]);
        if crossover(self.low, rp, self.low, r) {
            Action::Buy
        } else if crossover(rp, self.high, r, self.high) {
            Action::Sell
        } else {
            Action::Hold
        }
    }
}

struct Bands {
    specs: Vec<Spec>,
    prev_close: f64,
}

impl Strategy for Bands {
    fn indicators(&self) -> Vec<Spec> {
        self.specs.clone()
    }
    fn on_candle(&mut self, c: &Candle<'_>) -> Action {
        let (close, prev_close) = (c.bar.close, self.prev_close);
        self.prev_close = close;
        if c.prev.is_empty() {
            return Action::Hold;
        }
        // Outputs: upper, middle, lower.
        if crossover(prev_close, c.prev[0], close, c.values[0]) {
            Action::Buy
        } else if crossover(c.prev[2], prev_close, c.values[2], close) {
            Action::Sell
        } else {
            Action::Hold
        }
    }
}

struct Donchian {
    specs: Vec<Spec>,
}

impl Strategy for Donchian {
    fn indicators(&self) -> Vec<Spec> {
        self.specs.clone()
    }
    fn extra_warmup(&self) -> usize {
        1
    }
    fn on_candle(&mut self, c: &Candle<'_>) -> Action {
        if c.prev.is_empty() {
            return Action::Hold;
        }
        // Outputs: upper, lower; the previous candle's channel.
        if c.bar.close > c.prev[0] && c.position <= 0.0 {
            Action::Buy
        } else if c.bar.close < c.prev[1] && c.position >= 0.0 {
            Action::Sell
        } else {
            Action::Hold
        }
    }
}
