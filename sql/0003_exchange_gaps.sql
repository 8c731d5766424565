-- Exchange-confirmed gaps: ranges where Binance has no candles (maintenance, halts), recorded
-- by backfills so later runs and gap scans do not fetch them again and again.
-- [start_ms, end_ms) in open times; the latest row per (market, symbol, period, start_ms) wins.
CREATE TABLE IF NOT EXISTS exchange_gaps
(
    market String,
    symbol String,
    period String,
    start_ms Int64,
    end_ms Int64,
    recorded_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(recorded_at)
ORDER BY (market, symbol, period, start_ms);
