//! QuantService: a daemon that keeps ClickHouse full of correct, complete Binance candlestick
//! data for spot, USD-M (`um`) and COIN-M (`cm`) futures.
//!
//! It works like a Kubernetes operator: users declare desired state (rows in `trading_pairs`
//! and `proxy_config`, and `app.yaml`), a reconcile loop converges running tasks to it, and
//! observed state goes back to ClickHouse (`pair_status`).
//!
//! ```text
//!  app.yaml ──watch──► Config ─┐
//!  trading_pairs  ──poll──►    ├─► desired() ─► plan(desired, running) ─► Supervisor ─► tasks
//!  proxy_config   ──poll──►    ┘     (pure)          (pure)                  │
//!                                                                            ▼
//!    tasks: stream (WS) · backfill (archive + REST) · gap scan · indicators
//!       │  exchange client (rate governor, proxy pool)
//!       ▼
//!    writer (batched ClickHouse inserts) ──► klines / indicators / pair_status
//! ```
//!
//! Modules:
//! - [`config`]: `app.yaml` loading, defaults, validation (all errors at once), redaction.
//! - [`config_watch`]: live reload of `app.yaml` (watch, debounce, keep the last good config) and
//!   the outcome of each edit.
//! - [`market`]: markets, symbols, periods, exact decimals, klines; input validation.
//! - [`store`]: ClickHouse client, migrations, the batched kline writer, desired/observed state
//!   (it does not import `exchange`).
//! - [`logging`]: stdout/journald and rotated-file logs with secret scrubbing, live level.
//! - [`exchange`]: Binance transport: REST client, rate governor, egress pool (direct and
//!   SOCKS5 proxies: selection by remaining weight, quarantine, health), bulk archive reader,
//!   WebSocket streams. It imports neither `store` nor `operator`.
//! - [`operator`]: `desired()`/`plan()`, the supervisor, `pair_status`, the reconcile runtime;
//!   feeds `proxy_config` rows to the egress pool and writes its `proxy_status`.
//! - [`tasks`]: backfill engine, a pair's history and gap scans, the live stream sink.
//! - [`metrics`]: the counters of the `Metrics:` log line.
//! - [`backoff`]: jittered exponential backoff shared by every retry loop.
//! - [`app`]: the commands behind the CLI (daemon, `--check-config`, `migrate`, `backfill-gap`,
//!   `ws-start`).

pub mod app;
pub mod backoff;
pub mod config;
pub mod config_watch;
pub mod exchange;
pub mod faults;
pub mod logging;
pub use qs_core::market;
pub mod metrics;
pub mod operator;
pub mod status;
pub mod store;
pub mod tasks;

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
