//! Process-wide counters behind the `Metrics:` log line (`req=… ok=… fail=… rows=…`, counted
//! since the process started, across live reconfigurations that rebuild the clients).

use std::sync::atomic::{AtomicU64, Ordering};

/// REST requests sent to Binance.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// REST requests answered with success.
pub static OK: AtomicU64 = AtomicU64::new(0);
/// REST requests that failed (HTTP error, timeout, network).
pub static FAIL: AtomicU64 = AtomicU64::new(0);
/// Kline rows committed to ClickHouse.
pub static ROWS: AtomicU64 = AtomicU64::new(0);
/// Closed candles received on WebSocket streams.
pub static WS_FINALS: AtomicU64 = AtomicU64::new(0);
/// Stream socket reconnects.
pub static WS_RECONNECTS: AtomicU64 = AtomicU64::new(0);

/// Failures of supervised tasks (errors, panics, unexpected exits), restarted or not.
pub static TASK_FAILURES: AtomicU64 = AtomicU64::new(0);

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The metrics line, e.g. `Metrics: req=1250 ok=1248 fail=2 rows=124800 ws_finals=… reconnects=…
/// task_failures=… streams=…`.
pub fn line(streams: usize) -> String {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "Metrics: req={} ok={} fail={} rows={} ws_finals={} reconnects={} task_failures={} streams={streams}",
        g(&REQUESTS),
        g(&OK),
        g(&FAIL),
        g(&ROWS),
        g(&WS_FINALS),
        g(&WS_RECONNECTS),
        g(&TASK_FAILURES)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_line_starts_with_the_four_fields_users_parse() {
        let l = super::line(3);
        let fields: Vec<&str> = l.split(' ').collect();
        assert_eq!(fields[0], "Metrics:");
        for (f, name) in fields[1..5].iter().zip(["req", "ok", "fail", "rows"]) {
            let (k, v) = f.split_once('=').unwrap();
            assert_eq!(k, name);
            v.parse::<u64>().unwrap();
        }
        assert!(l.ends_with("streams=3"));
    }
}
