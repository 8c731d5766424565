//! Binance access: the REST client (klines, exchangeInfo, time), the rate governor it goes
//! through, and the bulk archive reader. Deciding what to fetch is not here (tasks do that).

pub mod archive;
pub mod egress;
pub mod governor;
pub mod rest;
pub mod ws;

use crate::exchange::governor::GovernorError;
use crate::market::Market;

/// A failed exchange call, classified: permanent errors are never retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    #[error("unknown symbol {symbol} on {market} (Binance: {msg})")]
    InvalidSymbol {
        market: Market,
        symbol: String,
        msg: String,
    },
    #[error("invalid interval {period} on {market} (Binance: {msg})")]
    InvalidInterval {
        market: Market,
        period: String,
        msg: String,
    },
    #[error("Binance rejected {url} (HTTP {status}, code {code}): {msg}")]
    Rejected {
        url: String,
        status: u16,
        code: i64,
        msg: String,
    },
    #[error(transparent)]
    Blocked(#[from] GovernorError),
    #[error("{url}: HTTP {status} after {attempts} attempts: {msg}")]
    Server {
        url: String,
        status: u16,
        attempts: u32,
        msg: String,
    },
    #[error("cannot reach {url} after {attempts} attempts: {msg}")]
    Network {
        url: String,
        attempts: u32,
        msg: String,
    },
    #[error("unexpected reply from {url}: {msg}")]
    Protocol { url: String, msg: String },
    #[error("no usable egress for {market}: {reason}")]
    NoEgress { market: Market, reason: String },
}

impl ExchangeError {
    /// Whether trying again later may help (a later run, or another egress for `Blocked`).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ExchangeError::Server { .. }
                | ExchangeError::Network { .. }
                | ExchangeError::NoEgress { .. }
        )
    }
}
