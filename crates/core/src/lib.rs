//! QuantService's pure core: the domain types every other part speaks (markets, symbols,
//! periods, exact decimals, klines, Unix-millisecond time) and, as they arrive, indicators,
//! strategies, backtest accounting, the order state machine and risk checks.
//!
//! Owns no I/O: no async runtime, no HTTP, ClickHouse or WebSocket client is a dependency of
//! this crate, so everything here is a plain function of its inputs and its tests run in
//! seconds (`cargo test -p qs-core`).

pub mod market;
pub mod time;
pub mod indicators;
pub mod backtest;
