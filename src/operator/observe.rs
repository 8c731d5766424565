//! What the operator shows: on `/metrics`, read at scrape time, observed state (every pair's
//! lag, last closed candle age, open gaps, reconnects and restarts; pairs per phase; the
//! daemon's tasks) and the running generation (the writer's queue, each egress's weight
//! window, proxy states); and to the service manager, the pair counts of its `STATUS=` line.
//! Collectors only read; the row-to-sample functions are pure and table-tested. The families
//! themselves are written by `crate::metrics`.

use std::sync::Weak;

use crate::exchange::egress::{ProxyPool, PROXY_STATES};
use crate::market::PairKey;
use crate::metrics::{Registration, Scrape};
use crate::status::{phase, task_state, StatusHub};
use crate::store::state::{StatusRow, TaskStatusRow};
use crate::store::writer::WriterGauge;

/// Every phase a pair is counted in (`quantservice_pairs`).
const PHASES: [&str; 8] = [
    phase::BACKFILLING,
    phase::STREAMING,
    phase::STREAM_DOWN,
    phase::HEALING,
    phase::IDLE,
    phase::ERROR,
    phase::PARKED,
    phase::DISABLED,
];

/// Every state a task is shown in (`quantservice_task_state`).
const TASK_STATES: [&str; 4] = [
    task_state::RUNNING,
    task_state::RESTARTING,
    task_state::FAILED,
    task_state::DISABLED,
];

/// The pairs' and tasks' families, from `status` (the daemon's, for its whole life).
pub fn status_collector(status: StatusHub) -> Registration {
    crate::metrics::register(move |s| {
        collect_pairs(&status.pairs(), crate::market::now_ms(), s);
        collect_tasks(&status.tasks(), s);
    })
}

/// The running generation's families; unregistered when the generation (which holds the
/// returned registration) goes. Holds neither the writer's channel nor the pool open.
pub fn generation_collector(writer: WriterGauge, pool: Weak<ProxyPool>) -> Registration {
    crate::metrics::register(move |s| {
        if let Some(queued) = writer.queued() {
            s.gauge(
                "quantservice_writer_queued_rows",
                "Kline rows accepted by the writer and not yet written (its channel plus the batch in hand).",
            )
            .value(queued as f64);
        }
        s.gauge(
            "quantservice_writer_queue_capacity_rows",
            "Rows the writer's channel holds before producers wait (app.writer.channel_capacity).",
        )
        .value(writer.capacity() as f64);
        if let Some(pool) = pool.upgrade() {
            collect_pool(&pool, s);
        }
    })
}

fn collect_pool(pool: &ProxyPool, s: &mut Scrape) {
    for g in pool.governors().all() {
        let labels = [("market", g.market().as_str()), ("egress", g.egress())];
        s.gauge(
            "quantservice_rest_weight_window_used",
            "REQUEST_WEIGHT counted in the current window (reserved by our requests, or reported by Binance).",
        )
        .sample(&labels, f64::from(g.window_used()));
        s.gauge(
            "quantservice_rest_weight_window_budget",
            "REQUEST_WEIGHT this process allows itself per window (the limit times app.backfill.weight_budget_ratio).",
        )
        .sample(&labels, f64::from(g.usable()));
    }
    let proxies = pool.status();
    collect_proxy_states(
        &proxies
            .iter()
            .map(|p| (format!("{}:{}", p.host, p.port), p.state.as_str()))
            .collect::<Vec<_>>(),
        s,
    );
}

/// `quantservice_proxy_state{proxy, state}`: 1 for each proxy's state, 0 for the others.
fn collect_proxy_states(proxies: &[(String, &str)], s: &mut Scrape) {
    let f = s.gauge(
        "quantservice_proxy_state",
        "Each proxy's state (1 for the current one): healthy, failing, quarantined or unchecked.",
    );
    for (proxy, state) in proxies {
        for st in PROXY_STATES {
            f.sample(
                &[("proxy", proxy), ("state", st)],
                if st == *state { 1.0 } else { 0.0 },
            );
        }
    }
}

/// Pairs per phase, and for every valid, not disabled pair: lag, last closed candle age (once
/// a closed candle was streamed), open gaps, reconnects and restarts. `now_ms`: Unix ms.
pub fn collect_pairs(rows: &[StatusRow], now_ms: i64, s: &mut Scrape) {
    let f = s.gauge(
        "quantservice_pairs",
        "Pairs known to the daemon, by phase (pair_status.phase).",
    );
    for p in PHASES {
        let n = rows.iter().filter(|r| r.phase == *p).count();
        f.sample(&[("phase", p)], n as f64);
    }
    for r in rows {
        // Bad trading_pairs rows are counted above (phase error) but have no series.
        let Ok(pair) = PairKey::parse(&r.market, &r.symbol, &r.period) else {
            continue;
        };
        if r.phase == phase::DISABLED {
            continue;
        }
        let labels = [
            ("market", r.market.as_str()),
            ("symbol", r.symbol.as_str()),
            ("period", r.period.as_str()),
        ];
        if r.last_closed_open_time > 0 {
            s.gauge(
                "quantservice_pair_lag_seconds",
                "Receipt time minus close time of the pair's last streamed candle (while stream_down: now minus that close).",
            )
            .sample(&labels, r.lag_ms as f64 / 1000.0);
            let closed = pair.period.next_open(r.last_closed_open_time);
            s.gauge(
                "quantservice_pair_last_closed_candle_age_seconds",
                "Now minus the close time of the pair's last closed candle received on its stream.",
            )
            .sample(&labels, (now_ms - closed).max(0) as f64 / 1000.0);
        }
        s.gauge(
            "quantservice_pair_open_gaps",
            "Missing candles the pair's last gap scan found (being healed).",
        )
        .sample(&labels, r.open_gaps as f64);
        s.counter(
            "quantservice_pair_stream_reconnects_total",
            "Reconnects of the WebSocket the pair streams on.",
        )
        .sample(&labels, r.reconnects as f64);
        s.counter(
            "quantservice_pair_restarts_total",
            "Restarts of the pair's task after a failure.",
        )
        .sample(&labels, r.restarts as f64);
    }
}

/// The service manager's status line (`systemctl status`): the pairs that are not disabled
/// (bad `trading_pairs` rows included) and their phases, e.g. `12 pairs: 11 streaming, 0
/// backfilling, 1 failed` (`failed`: error or parked), then other phases when present
/// (`, 2 history only`, `, 1 stream down`, `, 1 healing`).
pub fn status_line(rows: &[StatusRow]) -> String {
    let n = |phases: &[&str]| {
        rows.iter()
            .filter(|r| phases.contains(&r.phase.as_str()))
            .count()
    };
    let total = rows.iter().filter(|r| r.phase != phase::DISABLED).count();
    let mut line = format!(
        "{total} pair{}: {} streaming, {} backfilling, {} failed",
        if total == 1 { "" } else { "s" },
        n(&[phase::STREAMING]),
        n(&[phase::BACKFILLING]),
        n(&[phase::ERROR, phase::PARKED]),
    );
    for (p, name) in [
        (phase::IDLE, "history only"),
        (phase::STREAM_DOWN, "stream down"),
        (phase::HEALING, "healing"),
    ] {
        let k = n(&[p]);
        if k > 0 {
            line.push_str(&format!(", {k} {name}"));
        }
    }
    line
}

/// Each daemon task's state (1 for the current one) and restarts.
pub fn collect_tasks(rows: &[TaskStatusRow], s: &mut Scrape) {
    let f = s.gauge(
        "quantservice_task_state",
        "Each daemon task's state (1 for the current one): running, restarting, failed or disabled.",
    );
    for r in rows {
        for st in TASK_STATES {
            f.sample(
                &[("task", &r.task), ("state", st)],
                if st == r.state { 1.0 } else { 0.0 },
            );
        }
    }
    let f = s.counter(
        "quantservice_task_restarts_total",
        "Restarts of each daemon task after a failure.",
    );
    for r in rows {
        f.sample(&[("task", &r.task)], r.restarts as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(market: &str, symbol: &str, period: &str, phase: &str) -> StatusRow {
        StatusRow {
            market: market.into(),
            symbol: symbol.into(),
            period: period.into(),
            phase: phase.into(),
            ..StatusRow::default()
        }
    }

    #[test]
    fn pair_rows_become_series() {
        let mut streaming = row("um", "BTCUSDT", "1m", phase::STREAMING);
        streaming.last_closed_open_time = 1_700_000_040_000;
        streaming.lag_ms = 250;
        streaming.open_gaps = 3;
        streaming.reconnects = 2;
        let mut monthly = row("spot", "ETHUSDT", "1M", phase::STREAM_DOWN);
        // 2024-01-01: the candle closes on 2024-02-01 (31 days later, not a fixed length).
        monthly.last_closed_open_time = 1_704_067_200_000;
        let history_only = row("cm", "BTCUSD_PERP", "1d", phase::IDLE);
        let disabled = row("spot", "XRPUSDT", "1m", phase::DISABLED);
        let invalid = row("spot", "BTC-USDT", "1m", phase::ERROR);
        let now = 1_706_745_600_000 + 10_000; // 2024-02-01 + 10 s
        let mut s = Scrape::default();
        collect_pairs(
            &[streaming, monthly, history_only, disabled, invalid],
            now,
            &mut s,
        );
        let um = [("market", "um"), ("symbol", "BTCUSDT"), ("period", "1m")];
        assert_eq!(s.get("quantservice_pair_lag_seconds", &um), Some(0.25));
        assert_eq!(
            s.get("quantservice_pair_last_closed_candle_age_seconds", &um),
            Some(((now - 1_700_000_100_000) / 1000) as f64)
        );
        assert_eq!(s.get("quantservice_pair_open_gaps", &um), Some(3.0));
        assert_eq!(
            s.get("quantservice_pair_stream_reconnects_total", &um),
            Some(2.0)
        );
        let eth = [("market", "spot"), ("symbol", "ETHUSDT"), ("period", "1M")];
        assert_eq!(
            s.get("quantservice_pair_last_closed_candle_age_seconds", &eth),
            Some(10.0)
        );
        // History only: no stream, so no lag or age; gaps and restarts still.
        let cm = [
            ("market", "cm"),
            ("symbol", "BTCUSD_PERP"),
            ("period", "1d"),
        ];
        assert_eq!(s.get("quantservice_pair_lag_seconds", &cm), None);
        assert_eq!(s.get("quantservice_pair_open_gaps", &cm), Some(0.0));
        // Disabled and invalid rows have no series of their own, only their phase count.
        let xrp = [("market", "spot"), ("symbol", "XRPUSDT"), ("period", "1m")];
        assert_eq!(s.get("quantservice_pair_open_gaps", &xrp), None);
        let bad = [("market", "spot"), ("symbol", "BTC-USDT"), ("period", "1m")];
        assert_eq!(s.get("quantservice_pair_open_gaps", &bad), None);
        for (p, n) in [
            ("streaming", 1.0),
            ("stream_down", 1.0),
            ("idle", 1.0),
            ("disabled", 1.0),
            ("error", 1.0),
            ("parked", 0.0),
        ] {
            assert_eq!(s.get("quantservice_pairs", &[("phase", p)]), Some(n), "{p}");
        }
    }

    #[test]
    fn status_lines() {
        struct Case {
            phases: &'static [&'static str],
            line: &'static str,
        }
        let cases = [
            Case {
                phases: &[],
                line: "0 pairs: 0 streaming, 0 backfilling, 0 failed",
            },
            Case {
                phases: &[phase::BACKFILLING],
                line: "1 pair: 0 streaming, 1 backfilling, 0 failed",
            },
            Case {
                phases: &[
                    phase::STREAMING,
                    phase::STREAMING,
                    phase::ERROR,
                    phase::PARKED,
                    phase::DISABLED,
                    phase::IDLE,
                    phase::STREAM_DOWN,
                ],
                line:
                    "6 pairs: 2 streaming, 0 backfilling, 2 failed, 1 history only, 1 stream down",
            },
        ];
        for c in cases {
            let rows: Vec<StatusRow> = c
                .phases
                .iter()
                .map(|p| row("spot", "BTCUSDT", "1m", p))
                .collect();
            assert_eq!(status_line(&rows), c.line);
        }
    }

    #[test]
    fn one_state_series_per_proxy_and_state() {
        let mut s = Scrape::default();
        collect_proxy_states(
            &[
                ("10.0.0.1:1080".to_string(), "healthy"),
                ("10.0.0.2:1080".to_string(), "quarantined"),
            ],
            &mut s,
        );
        let text = s.render();
        assert_eq!(
            text.matches("quantservice_proxy_state{").count(),
            8,
            "{text}"
        );
        let st =
            |p: &str, st: &str| s.get("quantservice_proxy_state", &[("proxy", p), ("state", st)]);
        assert_eq!(st("10.0.0.1:1080", "healthy"), Some(1.0));
        assert_eq!(st("10.0.0.1:1080", "failing"), Some(0.0));
        assert_eq!(st("10.0.0.2:1080", "quarantined"), Some(1.0));
        assert_eq!(st("10.0.0.2:1080", "healthy"), Some(0.0));
    }

    #[test]
    fn task_rows_become_state_and_restart_series() {
        let rows = [TaskStatusRow {
            task: "ops_endpoint".into(),
            state: task_state::RESTARTING.into(),
            restarts: 4,
            ..TaskStatusRow::default()
        }];
        let mut s = Scrape::default();
        collect_tasks(&rows, &mut s);
        let st = |state: &str| {
            s.get(
                "quantservice_task_state",
                &[("task", "ops_endpoint"), ("state", state)],
            )
        };
        assert_eq!(st("restarting"), Some(1.0));
        assert_eq!(st("running"), Some(0.0));
        assert_eq!(
            s.get(
                "quantservice_task_restarts_total",
                &[("task", "ops_endpoint")]
            ),
            Some(4.0)
        );
    }
}
