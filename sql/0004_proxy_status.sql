-- Observed state per SOCKS5 proxy, written by the daemon. The latest row per (host, port) wins;
-- read it with FINAL. state: healthy, failing, quarantined or unchecked.
CREATE TABLE IF NOT EXISTS proxy_status
(
    host String,
    port UInt16,
    state String,
    last_error String DEFAULT '',
    requests UInt64 DEFAULT 0,
    failures UInt64 DEFAULT 0,
    weight_used UInt64 DEFAULT 0,
    updated_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (host, port);
