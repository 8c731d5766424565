-- Observed state of the daemon's own long-lived tasks (writer, live sink, status flusher, proxy
-- health checks, stream connections, ...), written by the daemon. The latest row per task wins;
-- read it with FINAL. state: running, restarting (failed; restarted after a backoff) or failed
-- (its loss was fatal: the process shut down to be restarted by systemd).
CREATE TABLE IF NOT EXISTS task_status
(
    task String,
    state String,
    restarts UInt64 DEFAULT 0,
    last_error String DEFAULT '',
    updated_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY task;
