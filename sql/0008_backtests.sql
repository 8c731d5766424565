-- Backtest results (see README "Backtests"), written by `quantservice backtest --save`.
-- Runs on 18.16 and newer.

-- One row per run: what ran on which candles with which settings, and every statistic
-- (backtesting.py 0.6.6's definitions; NaN where it gives NaN; durations in ms, -1 = none).
-- A parameter grid's runs share `batch_id`.
CREATE TABLE IF NOT EXISTS backtest_results
(
    run_id String,
    batch_id String,
    created_at DateTime DEFAULT now(),
    strategy String,
    params String,
    source String,
    market String,
    symbol String,
    period String,
    start_ms Int64,
    end_ms Int64,
    bars UInt64,
    cash Float64,
    commission Float64,
    slippage_bps Float64,
    sizing String,
    fill String,
    exclusive UInt8,
    long_only UInt8,
    finalize UInt8,
    exposure_pct Float64,
    equity_final Float64,
    equity_peak Float64,
    commissions Float64,
    return_pct Float64,
    buy_hold_return_pct Float64,
    return_ann_pct Float64,
    volatility_ann_pct Float64,
    cagr_pct Float64,
    sharpe Float64,
    sortino Float64,
    calmar Float64,
    alpha_pct Float64,
    beta Float64,
    max_drawdown_pct Float64,
    avg_drawdown_pct Float64,
    max_drawdown_duration_ms Int64,
    avg_drawdown_duration_ms Int64,
    trades UInt64,
    open_trades UInt64,
    win_rate_pct Float64,
    best_trade_pct Float64,
    worst_trade_pct Float64,
    avg_trade_pct Float64,
    max_trade_duration_ms Int64,
    avg_trade_duration_ms Int64,
    profit_factor Float64,
    expectancy_pct Float64,
    sqn Float64,
    kelly Float64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (strategy, created_at, run_id);

-- Every closed trade of a saved run, in the order they closed (`n` from 0).
CREATE TABLE IF NOT EXISTS backtest_trades
(
    run_id String,
    n UInt32,
    size Float64,
    entry_bar UInt64,
    exit_bar UInt64,
    entry_time Int64,
    exit_time Int64,
    entry_price Float64,
    exit_price Float64,
    pnl Float64,
    return_pct Float64,
    commission Float64
)
ENGINE = MergeTree
ORDER BY (run_id, n);
