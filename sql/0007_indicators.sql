-- Technical indicators (see README "Indicators in the daemon"). Runs on 18.16 and newer.

-- One row per (pair, indicator spec, output, candle). `indicator` is the normalised spec
-- (`macd(12,26,9)`), `output` its output name (`value` for single-output indicators).
-- `version` = computation time in microseconds: the latest computation wins; read with FINAL
-- (the per-pair views `indicators_{symbol}_{market}_{period}` do). Partitioned like klines.
CREATE TABLE IF NOT EXISTS indicators
(
    market String,
    symbol String,
    period String,
    open_time Int64,
    indicator String,
    output String,
    value Float64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYear(toDateTime(intDiv(open_time, 1000), 'UTC'))
ORDER BY (market, symbol, period, indicator, output, open_time);

-- Durable checkpoints of an indicator's incremental state: `state` is the state after the
-- candle at `open_time` (the last bar included), `bars` the number of bars consumed. Several
-- per (pair, indicator), so a late candle can be recomputed from one at or before it.
CREATE TABLE IF NOT EXISTS indicator_checkpoints
(
    market String,
    symbol String,
    period String,
    indicator String,
    open_time Int64,
    bars UInt64,
    state String,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (market, symbol, period, indicator, open_time);

-- Observed state per (pair, indicator), written by the daemon. The latest row wins.
CREATE TABLE IF NOT EXISTS indicator_status
(
    market String,
    symbol String,
    period String,
    indicator String,
    phase String,
    last_open_time Int64 DEFAULT 0,
    last_error String DEFAULT '',
    updated_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (market, symbol, period, indicator);
