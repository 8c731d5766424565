-- requires-clickhouse: 21.8
-- Improvements only newer servers support. Skipped on older servers (18.16) and applied by the
-- first start on 21.8 or newer. Being optional, a failure here is logged and retried at the
-- next start instead of stopping the daemon.

-- Readable timestamps for ad-hoc queries, computed on read (no storage).
ALTER TABLE klines ADD COLUMN IF NOT EXISTS open_dt DateTime64(3, 'UTC') ALIAS fromUnixTimestamp64Milli(open_time);
ALTER TABLE klines ADD COLUMN IF NOT EXISTS close_dt DateTime64(3, 'UTC') ALIAS fromUnixTimestamp64Milli(close_time);

-- Few distinct values: dictionary-encode them.
ALTER TABLE klines MODIFY COLUMN source LowCardinality(String);

-- Monotonic columns compress far better as deltas.
ALTER TABLE klines MODIFY COLUMN close_time Int64 CODEC(DoubleDelta, ZSTD(1));
ALTER TABLE klines MODIFY COLUMN ingested_at Int64 CODEC(DoubleDelta, ZSTD(1));
