//! Backtests from the command line: candles from CSV files or ClickHouse, the engine of
//! `qs_core::backtest`, results printed, reported in HTML and saved in ClickHouse.

pub mod command;
pub mod csv;
pub mod report;
pub mod run;
