//! The Binance transport: the REST client (klines, exchangeInfo, time) and its answer policy,
//! the rate governor it goes through, the egress pool it sends through (direct and SOCKS5
//! proxies), the bulk archive reader and the WebSocket kline streams. Not here: deciding what
//! to fetch (tasks), storing anything or reading desired state (`store`, `operator`: no module
//! of this one imports them; the operator feeds the egress pool its declared proxies).

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
    /// Whether trying the same call again later may help: server errors (5xx, 429/418 beyond
    /// the retry budget), network failures, no usable egress, a blocked egress (blocks and
    /// quarantines end), a garbled reply or a 4xx without a Binance error code (a proxy's or
    /// CDN's error page) and Binance's -10xx server errors may pass later; an unknown symbol
    /// or interval (a wrong or delisted pair) and Binance's other -11xx request errors will not.
    pub fn is_retryable(&self) -> bool {
        // Binance said the request itself is wrong (an unknown or delisted symbol, an interval
        // it does not offer, another request error): the same request will never work.
        // Everything else — bans and budgets, 5xx, network, no usable egress, a garbled reply,
        // a 4xx page without a Binance code — may pass later.
        match self {
            ExchangeError::InvalidSymbol { .. } | ExchangeError::InvalidInterval { .. } => false,
            // Binance's -11xx codes say the request itself is malformed; -10xx are server or
            // network trouble, and a 4xx without a Binance code is somebody's error page.
            ExchangeError::Rejected { code, .. } => !(-1199..=-1100).contains(code),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        name: &'static str,
        error: ExchangeError,
        retryable: bool,
    }

    #[test]
    fn permanent_errors_are_not_retryable() {
        let url = || "http://127.0.0.1/api/v3/klines".to_string();
        let cases = vec![
            Case {
                name: "unknown (or delisted) symbol",
                error: ExchangeError::InvalidSymbol {
                    market: Market::Spot,
                    symbol: "NOPEUSDT".into(),
                    msg: "Invalid symbol.".into(),
                },
                retryable: false,
            },
            Case {
                name: "unknown interval",
                error: ExchangeError::InvalidInterval {
                    market: Market::Cm,
                    period: "1s".into(),
                    msg: "Invalid interval.".into(),
                },
                retryable: false,
            },
            Case {
                name: "other rejection",
                error: ExchangeError::Rejected {
                    url: url(),
                    status: 400,
                    code: -1100,
                    msg: "Illegal characters".into(),
                },
                retryable: false,
            },
            Case {
                name: "a 404 page without a Binance code",
                error: ExchangeError::Rejected {
                    url: url(),
                    status: 404,
                    code: 0,
                    msg: "<html>Not Found</html>".into(),
                },
                retryable: true,
            },
            Case {
                name: "a -10xx server-side error",
                error: ExchangeError::Rejected {
                    url: url(),
                    status: 400,
                    code: -1007,
                    msg: "Timeout waiting for response from backend server.".into(),
                },
                retryable: true,
            },
            Case {
                name: "unreadable reply (a proxy's error page, a truncated body)",
                error: ExchangeError::Protocol {
                    url: url(),
                    msg: "invalid JSON".into(),
                },
                retryable: true,
            },
            Case {
                name: "server error after retries",
                error: ExchangeError::Server {
                    url: url(),
                    status: 503,
                    attempts: 5,
                    msg: "Service Unavailable".into(),
                },
                retryable: true,
            },
            Case {
                name: "network failure after retries",
                error: ExchangeError::Network {
                    url: url(),
                    attempts: 5,
                    msg: "connection refused".into(),
                },
                retryable: true,
            },
            Case {
                name: "no usable egress",
                error: ExchangeError::NoEgress {
                    market: Market::Um,
                    reason: "127.0.0.1:1080 quarantined".into(),
                },
                retryable: true,
            },
            Case {
                name: "blocked egress (403/451 for a while)",
                error: ExchangeError::Blocked(GovernorError::Blocked {
                    market: Market::Spot,
                    egress: "direct".into(),
                    status: 451,
                    reason: "restricted location".into(),
                }),
                retryable: true,
            },
        ];
        for c in cases {
            assert_eq!(c.error.is_retryable(), c.retryable, "case: {}", c.name);
        }
    }

    /// The `.rs` files under `src/<dir>`, with their text.
    fn sources(dir: &str) -> Vec<(std::path::PathBuf, String)> {
        let mut out = Vec::new();
        let mut todo = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(dir)];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    out.push((path, text));
                }
            }
        }
        out
    }

    #[test]
    fn layers_have_no_cycle_between_exchange_and_store() {
        let exchange = sources("exchange");
        assert!(exchange.len() >= 10, "{} files", exchange.len());
        // Built here so that this file does not name them itself.
        let banned = ["store", "operator"].map(|m| format!("crate::{m}"));
        for (path, text) in exchange {
            for b in &banned {
                assert!(!text.contains(b.as_str()), "{} uses {b}", path.display());
            }
        }
        let store = sources("store");
        assert!(!store.is_empty());
        for (path, text) in store {
            assert!(
                !text.contains(&format!("crate::{}", "exchange")),
                "{} uses the exchange layer",
                path.display()
            );
        }
    }
}
