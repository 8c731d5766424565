-- Base schema. Runs on ClickHouse 18.16 and newer: no DateTime64, codecs, TTL,
-- LowCardinality or ADD COLUMN IF NOT EXISTS here (newer-only improvements go in gated files).
-- Statements are separated by ';' at the end of a line; no ';' inside string literals.

-- Every candle of every pair. Prices and volumes are exact decimals as Binance printed them;
-- times are Unix milliseconds UTC. `version` = is_final << 63 | ingest time in microseconds,
-- so a closed candle replaces an in-progress one, then the newest ingest wins.
-- Readers that need exact answers use FINAL (the per-pair views do).
CREATE TABLE IF NOT EXISTS klines
(
    market String,
    symbol String,
    period String,
    open_time Int64,
    close_time Int64,
    open Decimal(38, 8),
    high Decimal(38, 8),
    low Decimal(38, 8),
    close Decimal(38, 8),
    volume Decimal(38, 8),
    quote_volume Decimal(38, 8),
    trades UInt64,
    taker_buy_volume Decimal(38, 8),
    taker_buy_quote_volume Decimal(38, 8),
    is_final UInt8,
    source String,
    ingested_at Int64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYear(toDateTime(intDiv(open_time, 1000), 'UTC'))
ORDER BY (market, symbol, period, open_time);

-- What to collect (desired state). One logical row per (market, symbol, period): the latest
-- row wins; read it with FINAL. `INSERT INTO trading_pairs (market, symbol, period) VALUES
-- ('um', 'BTCUSDT', '1m')` is all a user types; enabled = 0 disables a pair.
CREATE TABLE IF NOT EXISTS trading_pairs
(
    market String,
    symbol String,
    period String,
    enabled UInt8 DEFAULT 1,
    backfill_from Int64 DEFAULT 0,
    stream UInt8 DEFAULT 1,
    indicators String DEFAULT '',
    updated_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (market, symbol, period);

-- SOCKS5 egress (desired state). The latest row per (host, port) wins.
CREATE TABLE IF NOT EXISTS proxy_config
(
    host String,
    port UInt16,
    username String DEFAULT '',
    password String DEFAULT '',
    enabled UInt8 DEFAULT 1,
    created_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(created_at)
ORDER BY (host, port);

-- Observed state per pair, written by the daemon on change. The latest row wins.
CREATE TABLE IF NOT EXISTS pair_status
(
    market String,
    symbol String,
    period String,
    phase String,
    backfilled_from Int64 DEFAULT 0,
    backfilled_to Int64 DEFAULT 0,
    last_closed_open_time Int64 DEFAULT 0,
    lag_ms Int64 DEFAULT 0,
    open_gaps UInt64 DEFAULT 0,
    reconnects UInt64 DEFAULT 0,
    restarts UInt64 DEFAULT 0,
    last_error String DEFAULT '',
    updated_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (market, symbol, period);
