//! Backtests against backtesting.py 0.6.6 (golden files written by scripts/backtest-golden.py
//! into tests/data/backtest/): every trade (bars, size, prices, PnL, return, commission), the
//! equity at every candle and every statistic within a relative 1e-9.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::PathBuf;

use qs_core::backtest::{self, strategies, Fill, Options, Series, Sizing, Stats};
use qs_core::indicators::Bar;
use serde_json::Value;

const REL: f64 = 1e-9;

fn data(rel: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "..", "..", "tests", "data", rel]
        .iter()
        .collect()
}

/// backtesting.py's GOOG.csv (`date,Open,High,Low,Close,Volume`) or a Binance kline CSV.
fn load(rel: &str) -> Series {
    let text = std::fs::read_to_string(data(rel)).unwrap();
    let mut s = Series::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if !f[0].starts_with(|c: char| c.is_ascii_digit()) {
            continue; // header
        }
        let t = if f[0].contains(' ') {
            chrono::NaiveDateTime::parse_from_str(f[0], "%Y-%m-%d %H:%M:%S")
                .unwrap()
                .and_utc()
                .timestamp_millis()
        } else if f[0].contains('-') {
            let d = chrono::NaiveDate::parse_from_str(f[0], "%Y-%m-%d").unwrap();
            d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis()
        } else {
            f[0].parse().unwrap()
        };
        let x = |i: usize| f[i].parse::<f64>().unwrap();
        s.push(
            t,
            &Bar {
                open: x(1),
                high: x(2),
                low: x(3),
                close: x(4),
                volume: x(5),
                quote_volume: 0.0,
            },
        );
    }
    s
}

/// A golden file (gzipped JSON).
fn golden_json(name: &str) -> Value {
    use std::io::Read;
    let file = std::fs::File::open(data(&format!("backtest/{name}.json.gz"))).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "NaN" => f64::NAN,
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::Null => f64::NAN,
        v => v.as_f64().unwrap(),
    }
}

fn close(what: &str, ours: f64, theirs: f64) {
    let ok = (ours.is_nan() && theirs.is_nan())
        || ours == theirs
        || (ours - theirs).abs() <= REL * theirs.abs();
    assert!(ok, "{what}: ours {ours:?}, backtesting.py {theirs:?}");
}

fn stat(s: &Stats, name: &str) -> Option<f64> {
    let d = |x: Option<i64>| x.map_or(f64::NAN, |v| v as f64);
    Some(match name {
        "Start" => s.start as f64,
        "End" => s.end as f64,
        "Duration" => s.duration_ms as f64,
        "Exposure Time [%]" => s.exposure_pct,
        "Equity Final [$]" => s.equity_final,
        "Equity Peak [$]" => s.equity_peak,
        "Commissions [$]" => s.commissions,
        "Return [%]" => s.return_pct,
        "Buy & Hold Return [%]" => s.buy_hold_return_pct,
        "Return (Ann.) [%]" => s.return_ann_pct,
        "Volatility (Ann.) [%]" => s.volatility_ann_pct,
        "CAGR [%]" => s.cagr_pct,
        "Sharpe Ratio" => s.sharpe,
        "Sortino Ratio" => s.sortino,
        "Calmar Ratio" => s.calmar,
        "Alpha [%]" => s.alpha_pct,
        "Beta" => s.beta,
        "Max. Drawdown [%]" => s.max_drawdown_pct,
        "Avg. Drawdown [%]" => s.avg_drawdown_pct,
        "Max. Drawdown Duration" => d(s.max_drawdown_duration_ms),
        "Avg. Drawdown Duration" => d(s.avg_drawdown_duration_ms),
        "# Trades" => s.trades as f64,
        "Win Rate [%]" => s.win_rate_pct,
        "Best Trade [%]" => s.best_trade_pct,
        "Worst Trade [%]" => s.worst_trade_pct,
        "Avg. Trade [%]" => s.avg_trade_pct,
        "Max. Trade Duration" => d(s.max_trade_duration_ms),
        "Avg. Trade Duration" => d(s.avg_trade_duration_ms),
        "Profit Factor" => s.profit_factor,
        "Expectancy [%]" => s.expectancy_pct,
        "SQN" => s.sqn,
        "Kelly Criterion" => s.kelly,
        _ => return None,
    })
}

fn check(golden: &str, csv: &str, strategy: &str, o: &Options) {
    let g = golden_json(golden);
    let series = load(csv);
    assert_eq!(series.len() as u64, g["bars"].as_u64().unwrap());
    let params: Vec<(String, f64)> = g["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let mut st = strategies::build(strategy, &params).unwrap();
    let out = backtest::run(st.as_mut(), &series, o);
    let want = g["trades"].as_array().unwrap();
    for (i, (t, w)) in out.trades.iter().zip(want).enumerate() {
        let what = |f: &str| format!("{golden} trade {i} {f}");
        assert_eq!(
            t.entry_bar as u64,
            w["entry_bar"].as_u64().unwrap(),
            "{}",
            what("entry_bar")
        );
        assert_eq!(
            t.exit_bar as u64,
            w["exit_bar"].as_u64().unwrap(),
            "{}",
            what("exit_bar")
        );
        close(&what("size"), t.size, num(&w["size"]));
        close(&what("entry_price"), t.entry_price, num(&w["entry_price"]));
        close(&what("exit_price"), t.exit_price, num(&w["exit_price"]));
        close(&what("pnl"), t.pnl, num(&w["pnl"]));
        close(&what("return_pct"), t.return_pct, num(&w["return_pct"]));
        close(&what("commission"), t.commission, num(&w["commission"]));
    }
    assert_eq!(out.trades.len(), want.len(), "{golden}: trade count");
    for (i, (e, w)) in out
        .equity
        .iter()
        .zip(g["equity"].as_array().unwrap())
        .enumerate()
    {
        close(&format!("{golden} equity at {i}"), *e, num(w));
    }
    let mut checked = 0;
    for (name, v) in g["stats"].as_object().unwrap() {
        if let Some(ours) = stat(&out.stats, name) {
            close(&format!("{golden} {name}"), ours, num(v));
            checked += 1;
        }
    }
    assert!(
        checked >= 30,
        "{golden}: only {checked} statistics compared"
    );
}

#[test]
fn quick_start_sma_cross_on_goog_matches_backtesting_py() {
    let o = Options {
        cash: 10_000.0,
        commission: 0.002,
        exclusive: true,
        ..Options::default()
    };
    check("goog_sma_cross_10_20", "backtest/GOOG.csv", "sma_cross", &o);
}

#[test]
fn sma_cross_on_btcusdt_hourly_matches_backtesting_py() {
    let o = Options {
        cash: 1_000_000.0,
        commission: 0.0004,
        exclusive: true,
        ..Options::default()
    };
    check(
        "btcusdt_um_1h_sma_cross_24_72",
        "binance/um/BTCUSDT-1h-2024-01-01_2025-12-20.csv",
        "sma_cross",
        &o,
    );
}

#[test]
fn long_only_on_close_finalized_matches_backtesting_py() {
    let o = Options {
        cash: 1_000_000.0,
        commission: 0.001,
        fill: Fill::Close,
        long_only: true,
        finalize: true,
        sizing: Sizing::Whole,
        ..Options::default()
    };
    check(
        "btcusdt_um_1h_sma_cross_50_200_long_only",
        "binance/um/BTCUSDT-1h-2024-01-01_2025-12-20.csv",
        "sma_cross",
        &o,
    );
}

const BTC_1H: &str = "binance/um/BTCUSDT-1h-2024-01-01_2025-12-20.csv";

#[test]
fn ema_cross_with_slippage_matches_backtesting_py() {
    let o = Options {
        cash: 1_000_000.0,
        commission: 0.0004,
        spread: 0.0002,
        exclusive: true,
        ..Options::default()
    };
    check(
        "btcusdt_um_1h_ema_cross_12_26_spread",
        BTC_1H,
        "ema_cross",
        &o,
    );
}

#[test]
fn rsi_reversion_matches_backtesting_py_with_talib_rsi() {
    let o = Options {
        cash: 1_000_000.0,
        commission: 0.001,
        exclusive: true,
        ..Options::default()
    };
    check(
        "btcusdt_um_1h_rsi_reversion_14_30_70",
        BTC_1H,
        "rsi_reversion",
        &o,
    );
}

/// Not exclusive (backtesting.py's default): an opposite signal reduces the position first,
/// a short grows until the equity is gone, and the run stops there as backtesting.py's does.
#[test]
fn macd_cross_without_exclusive_orders_runs_out_of_money_as_backtesting_py() {
    let o = Options {
        cash: 1_000_000.0,
        commission: 0.0004,
        ..Options::default()
    };
    check("btcusdt_um_1h_macd_cross_12_26_9", BTC_1H, "macd_cross", &o);
}

#[test]
fn bbands_breakout_on_goog_matches_backtesting_py() {
    let o = Options {
        cash: 10_000.0,
        commission: 0.002,
        exclusive: true,
        ..Options::default()
    };
    check(
        "goog_bbands_breakout_20_2",
        "backtest/GOOG.csv",
        "bbands_breakout",
        &o,
    );
}

#[test]
fn a_spot_month_with_finalize_matches_backtesting_py() {
    let o = Options {
        cash: 1_000_000.0,
        commission: 0.001,
        exclusive: true,
        finalize: true,
        ..Options::default()
    };
    check(
        "btcusdt_spot_1h_2022_01_sma_cross_5_15",
        "binance/spot/BTCUSDT-1h-2022-01.csv",
        "sma_cross",
        &o,
    );
}

/// Hourly forex without weekends: 252 trading days a year.
#[test]
fn eurusd_hourly_matches_backtesting_py() {
    let o = Options {
        cash: 10_000.0,
        commission: 0.0002,
        exclusive: true,
        ..Options::default()
    };
    check(
        "eurusd_1h_sma_cross_10_30",
        "backtest/EURUSD.csv",
        "sma_cross",
        &o,
    );
}

/// Monthly candles: returns per month-end, 12 a year.
#[test]
fn monthly_btcusd_matches_backtesting_py() {
    let o = Options {
        cash: 100_000.0,
        commission: 0.001,
        exclusive: true,
        ..Options::default()
    };
    check(
        "btcusd_monthly_sma_cross_3_6",
        "backtest/BTCUSD.csv",
        "sma_cross",
        &o,
    );
}
