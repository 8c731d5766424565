-- Partitions that received late or replaced rows, and their OPTIMIZEs (`quantservice optimize`
-- and the daemon's `app.maintenance.optimize` schedule). Two rows per (table, partition):
--   event = 'dirty':     event_time = when the writer last recorded such rows committed there;
--   event = 'optimized': event_time = when the last successful OPTIMIZE of it started (every mark
--                        older than that is covered by it), finished_at = when it ended.
-- Times come from the server's clock (DEFAULT now(), or a `now()` read from it), so the daemon
-- and the command compare on one clock. A partition is dirty while its 'dirty' event_time is
-- not older than its 'optimized' one (same second counts as dirty: safe side).
-- The latest row per (table_name, partition_id, event) wins; read it with FINAL.
CREATE TABLE IF NOT EXISTS partition_maintenance
(
    table_name String,
    partition_id String,
    event String,
    event_time DateTime DEFAULT now(),
    finished_at DateTime DEFAULT now(),
    with_final UInt8 DEFAULT 0,
    duration_ms UInt64 DEFAULT 0
)
ENGINE = ReplacingMergeTree(event_time)
ORDER BY (table_name, partition_id, event);
