//! QuantService: a daemon that keeps ClickHouse full of correct, complete Binance candlestick
//! data for spot, USD-M (`um`) and COIN-M (`cm`) futures.
//!
//! It works like a Kubernetes operator: users declare desired state (rows in `trading_pairs`
//! and `proxy_config`, and `app.yaml`), a reconcile loop converges running tasks to it, and
//! observed state goes back to ClickHouse (`pair_status`, `task_status`, `proxy_status`).
//!
//! ```text
//!  app.yaml ──watch──► Config ─┐
//!  trading_pairs  ──poll──►    ├─► desired() ─► plan(desired, running) ─► Supervisor ─► tasks
//!  proxy_config   ──poll──►    ┘     (pure)          (pure)                  │
//!                                                                            ▼
//!    tasks: stream (WS) · live sink · backfill (archive + REST) · gap scan · indicators
//!       │  exchange transport (rate governor, egress pool)
//!       ▼
//!    writer (batched ClickHouse inserts) ──► klines · indicators · status flusher ──► *_status
//! ```
//!
//! Modules, in data-flow order (each uses only the ones above it, plus the cross-cutting
//! ones at the end; `tests/layers.rs` checks there is no import cycle):
//! - [`config`]: `app.yaml` loading, defaults, validation (all errors at once), redaction.
//! - [`config_watch`]: live reload of `app.yaml` (watch, debounce, keep the last good config) and
//!   the outcome of each edit.
//! - [`market`]: markets, symbols, periods, exact decimals, klines; input validation (the pure
//!   `qs-core` crate, re-exported).
//! - [`store`]: ClickHouse client, migrations, the batched kline writer, the desired- and
//!   observed-state tables, the partitions that need an `OPTIMIZE` (it does not import
//!   `exchange`).
//! - [`exchange`]: Binance transport: REST client (with the pure answer policy `classify`),
//!   rate governor, egress pool (direct and SOCKS5 proxies: pure selection, quarantine,
//!   health), bulk archive reader, WebSocket streams (pure stream assignment). It imports
//!   neither `store` nor `operator`.
//! - [`status`]: observed state in memory (`pair_status`, `task_status`) and its flusher.
//! - [`tasks`]: the task kinds, keys, specs and typed errors; backfill engine, a pair's history
//!   and gap scans (and their schedule), the live stream sink, maintenance (`optimize` and its
//!   schedule).
//! - [`server`]: the daemon's HTTP servers: the ops endpoint (`/healthz`, `/readyz`, `/metrics`)
//!   and the client of `quantservice ready`.
//! - [`operator`]: `desired()`/`plan()`, the supervisor, the reconcile runtime, the daemon's own
//!   services that outlive generations (the ops endpoint); feeds `proxy_config` rows to the
//!   egress pool and writes its `proxy_status`.
//! - [`app`]: the commands behind the CLI (daemon, `--check-config`, `migrate`, `backfill-gap`,
//!   `ws-start`, `optimize`, `indicators`, `ready`).
//! - [`backtest`]: the `backtest` command over `qs_core::backtest`: CSV and stored candles,
//!   parameter grids, the HTML report, results saved to `backtest_results`/`backtest_trades`.
//!
//! Cross-cutting:
//! - [`logging`]: stdout/journald and the rotated, archived log file with secret scrubbing;
//!   live level, `max_size` and `keep_days`.
//! - [`metrics`]: the counters of the `Metrics:` log line.
//! - [`backoff`]: jittered exponential backoff shared by every retry loop.
//! - [`faults`]: fault points a test in the same process can arm (inert otherwise).
//! - [`systemd`]: the service manager's notify protocol (`READY=1`, `STATUS=`, `STOPPING=1`,
//!   `WATCHDOG=1`).

pub mod config;
pub mod config_watch;
pub use qs_core::market;
pub mod store;
pub mod exchange;
pub mod status;
pub mod tasks;
pub mod server;
pub mod operator;
pub mod app;
pub mod backtest;

pub mod logging;
pub mod metrics;
pub mod backoff;
pub mod faults;
pub mod systemd;

/// Locks `m`, taking the data of a lock that a panicking holder poisoned (every lock here
/// guards state that stays consistent between statements).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The unsigned number written right after `prefix` in `text` (`Code: 193`, `banned until
/// 1712345678901`), as servers put them in their messages.
pub(crate) fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// An error and all its sources on one line (hyper and reqwest hide the useful part in
/// `source()`); a source already contained in the text so far is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// A periodic timer that, after a stall, delays the next tick instead of firing a burst of
/// missed ones (every loop here wants that). The first tick completes at once.
pub fn ticker(period: std::time::Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// What a task that did not finish normally says: `the task panicked: <message>` (a `panic!`
/// payload is a `&str` or a `String`), or that it was aborted.
pub fn join_error_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text payload".to_string());
            format!("the task panicked: {msg}")
        }
        Err(_) => "the task was aborted".to_string(),
    }
}
