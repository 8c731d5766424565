//! Proxy-pool benchmark (issue "SOCKS5 proxy pool", §5): REST backfill throughput with 0
//! (direct), 1, 2 and 4 `microsocks` proxies, each binding its outgoing connections to its own
//! loopback address, against a simulator that gives every source address its own weight
//! budget (um: `QS_BENCH_BUDGET` weight per 10 s, default 60, so the budget is what limits a
//! single egress). Target: N proxies ≥ 0.9 × N × the single-egress rate, zero 429s.
//!
//! Run: `cargo bench --bench proxies` (starts a private ClickHouse; needs `microsocks`).
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Socks, TestDb, SOCKS_PASSWORD, SOCKS_USER};
use indicatif::ProgressBar;
use qs_sim::{self as sim, SimConfig};
use quantservice::app::{backfill_gap, BackfillRequest};
use quantservice::market::{Market, Period};
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let budget: u32 = std::env::var("QS_BENCH_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let window = Duration::from_secs(10);
    // Rows per run and egress: about 25 s of one egress's budget (2 weight per 499 rows).
    let per_egress_rows: i64 = std::env::var("QS_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    println!("| egresses | rows | seconds | rows/s | × direct | target | 429 | 418 |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut direct_rate = 0.0;
    for n in [0usize, 1, 2, 4] {
        let sim = sim::start(
            SimConfig::default().with_budget(Market::Um, budget, window),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let proxies: Vec<Socks> = (0..n)
            .map(|i| Socks::start(&format!("127.0.0.{}", i + 2)))
            .collect();
        let db = TestDb::new(&format!("bench_px{n}"));
        let mode = if n == 0 { "never" } else { "always" };
        let cfg = db.config(&format!(
            "{}  backfill:\n    concurrency: 8\n  proxy:\n    mode: {mode}\n",
            common::sim_binance_yaml(&sim, "")
        ));
        quantservice::app::migrate(&cfg).await.unwrap();
        for p in &proxies {
            db.sql(&format!(
                "INSERT INTO proxy_config (host, port, username, password, enabled, created_at) VALUES ('127.0.0.1', {}, '{SOCKS_USER}', '{SOCKS_PASSWORD}', 1, now())",
                p.port
            ));
        }
        let rows = per_egress_rows * i64::try_from(n.max(1)).unwrap();
        let end = Period::M1.align(sim::now_ms()) - 60 * MIN;
        let start = end - rows * MIN;
        let req = BackfillRequest {
            market: "um".into(),
            symbol: "BTCUSDT".into(),
            period: "1m".into(),
            start_ms: start,
            end_ms: end,
            source: Some("rest".into()),
        };
        let t = Instant::now();
        let out = backfill_gap(cfg, req, ProgressBar::hidden(), CancellationToken::new())
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let rate = out.rows_written as f64 / secs;
        if n == 0 {
            direct_rate = rate;
        }
        let ratio = rate / direct_rate;
        let target = if n == 0 {
            "—".to_string()
        } else {
            format!(
                "≥ {:.1}× {}",
                0.9 * n as f64,
                if ratio >= 0.9 * n as f64 {
                    "met"
                } else {
                    "MISSED"
                }
            )
        };
        println!(
            "| {} | {} | {secs:.1} | {rate:.0} | {ratio:.2}× | {target} | {} | {} |",
            if n == 0 {
                "direct".to_string()
            } else {
                format!("{n} proxies")
            },
            out.rows_written,
            sim.count_status(429),
            sim.count_status(418)
        );
        sim.shutdown().await;
    }
}
