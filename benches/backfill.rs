//! Backfill benchmarks (issue "Historical backfill", §8), printed as a table:
//! 1. archive path end to end into ClickHouse, rows/s, against `clickhouse-client` inserting
//!    the same rows from CSV in the same run (target ≥ 0.8×);
//! 2. REST path: fraction of the simulator's weight budget used during a 2-minute backfill
//!    (target ≥ 90 %, zero 429s);
//! 3. peak RSS of `quantservice backfill-gap` filling 5 years of 1m candles (target < 200 MB).
//!
//! Run: `cargo bench --bench backfill` (starts a private ClickHouse; `QS_BENCH_QUICK=1` runs
//! shorter variants). Needs `clickhouse-client` for the anchor.
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use common::median;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use indicatif::ProgressBar;
use qs_sim::{self as sim, SimConfig, SimHandle};
use quantservice::app::{backfill_gap, BackfillRequest};
use quantservice::market::{month_label, next_month_start};
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;

fn quick() -> bool {
    std::env::var("QS_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn sim_yaml(sim: &SimHandle, extra: &str) -> String {
    format!("{}{extra}", common::sim_binance_yaml(sim, ""))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("| benchmark | ours | anchor | ratio / target |");
        println!("|---|---|---|---|");
        let only = std::env::var("QS_BENCH_ONLY").unwrap_or_default();
        if only.is_empty() || only == "archive" {
            archive_vs_clickhouse_client().await;
        }
        if only.is_empty() || only == "rest" {
            rest_budget_use().await;
        }
        if only.is_empty() || only == "rss" {
            peak_rss_five_years().await;
        }
    });
}

/// 1. Archive path vs clickhouse-client on the same rows.
async fn archive_vs_clickhouse_client() {
    let months = if quick() { 2 } else { 6 };
    let sim = sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let start = 1_609_459_200_000i64; // 2021-01-01
    let mut end = start;
    for _ in 0..months {
        end = next_month_start(end);
    }
    // Warm the simulator's zip cache and build the anchor's CSV from the very same files.
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("rows.csv");
    let mut csv = std::fs::File::create(&csv_path).unwrap();
    let mut rows = 0u64;
    let mut m = start;
    while m < end {
        let url = format!(
            "{}/data/spot/monthly/klines/BTCUSDT/1m/BTCUSDT-1m-{}.zip",
            sim.archive_url(),
            month_label(m)
        );
        let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
        let mut text = String::new();
        zip.by_index(0).unwrap().read_to_string(&mut text).unwrap();
        rows += text.lines().count() as u64;
        csv.write_all(text.as_bytes()).unwrap();
        m = next_month_start(m);
    }
    drop(csv);
    let server = common::private();
    let tcp = server.tcp_port().unwrap();

    let (mut ours, mut anchor) = (Vec::new(), Vec::new());
    for run in 0..3 {
        // Ours: download, checksum, decode, write, end to end.
        let db = TestDb::new_private(&format!("bench_archive_{run}"));
        let cfg = db.config(&sim_yaml(
            &sim,
            &std::env::var("QS_BENCH_EXTRA").unwrap_or_default(),
        ));
        let req = BackfillRequest {
            market: "spot".into(),
            symbol: "BTCUSDT".into(),
            period: "1m".into(),
            start_ms: start,
            end_ms: end,
            source: Some("archive".into()),
        };
        let t = Instant::now();
        let out = backfill_gap(cfg, req, ProgressBar::hidden(), CancellationToken::new())
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(out.rows_written, rows, "{out}");
        ours.push(rows as f64 / secs);
        // Anchor: clickhouse-client inserting the same rows from CSV into the same types.
        let adb = TestDb::new_private(&format!("bench_anchor_{run}"));
        adb.create();
        adb.sql(
            "CREATE TABLE rows (open_time Int64, open Decimal(38, 8), high Decimal(38, 8), \
             low Decimal(38, 8), close Decimal(38, 8), volume Decimal(38, 8), close_time Int64, \
             quote_volume Decimal(38, 8), trades UInt64, taker_buy_volume Decimal(38, 8), \
             taker_buy_quote_volume Decimal(38, 8), ignore String) \
             ENGINE = MergeTree ORDER BY open_time",
        );
        let t = Instant::now();
        let status = Command::new("clickhouse-client")
            .args([
                "--port",
                &tcp.to_string(),
                "--database",
                &adb.name,
                "--query",
                "INSERT INTO rows FORMAT CSV",
            ])
            .stdin(std::fs::File::open(&csv_path).unwrap())
            .status()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(status.success());
        assert_eq!(adb.sql("SELECT count() FROM rows").trim(), rows.to_string());
        anchor.push(rows as f64 / secs);
    }
    let (o, a) = (median(&mut ours), median(&mut anchor));
    println!(
        "| archive path, {rows} spot 1m rows ({months} monthly files), rows/s (median of 3) | {o:.0} | {a:.0} (clickhouse-client, CSV) | {:.2}× (target ≥ 0.8×) |",
        o / a
    );
}

/// 2. REST path: weight used / budget over two whole one-minute windows.
async fn rest_budget_use() {
    let sim = sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let db = TestDb::new_private("bench_rest");
    let minutes: i64 = if quick() { 1 } else { 2 };
    // Start right at a window boundary so the run covers whole windows.
    let now = sim::now_ms();
    let boundary = (now / MIN + 1) * MIN;
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(boundary - now).unwrap(),
    ))
    .await;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(u64::try_from(minutes * MIN).unwrap())).await;
        trigger.cancel();
    });
    let cfg = db.config(&sim_yaml(&sim, "  backfill:\n    concurrency: 8\n"));
    let req = BackfillRequest {
        market: "um".into(),
        symbol: "ETHUSDT".into(),
        period: "1m".into(),
        start_ms: 1_577_836_800_000, // 2020-01-01
        end_ms: 1_735_689_600_000,   // 2025-01-01: more than 2 minutes of work
        source: Some("rest".into()),
    };
    let _ = backfill_gap(cfg, req, ProgressBar::hidden(), cancel).await;
    let log = sim.requests();
    let weight: u64 = log
        .iter()
        .filter(|r| r.at_ms >= boundary && r.at_ms < boundary + minutes * MIN)
        .map(|r| u64::from(r.weight))
        .sum();
    let budget = 2400 * u64::try_from(minutes).unwrap();
    if std::env::var("QS_BENCH_DEBUG").is_ok() {
        for w in 0..minutes {
            let ws = boundary + w * MIN;
            let in_window: Vec<_> = log
                .iter()
                .filter(|r| r.at_ms >= ws && r.at_ms < ws + MIN && r.weight > 0)
                .collect();
            let total: u32 = in_window.iter().map(|r| r.weight).sum();
            let last = in_window.last().map_or(0, |r| r.at_ms - ws);
            eprintln!(
                "window {w}: weight {total}, {} requests, last at +{last} ms",
                in_window.len()
            );
        }
    }
    let (e429, e418) = (sim.count_status(429), sim.count_status(418));
    println!(
        "| REST path, um 1m, {minutes} whole minute(s) at 2400 weight/min | {weight} weight = {:.1} % of the budget, {e429}× 429, {e418}× 418 | budget {budget} | target ≥ 90 %, zero 429 |",
        100.0 * weight as f64 / budget as f64
    );
}

/// 3. Peak RSS of the backfill process over 5 years of 1m candles (archives, auto).
async fn peak_rss_five_years() {
    let years = if quick() { 1 } else { 5 };
    let bin = env!("CARGO_BIN_EXE_quantservice");
    let port = common::dead_port();
    let mut sim = Command::new(bin)
        .args(["sim-exchange", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for "listening".
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(sim.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
    }
    assert!(line.contains("listening"), "{line}");
    let db = TestDb::new_private("bench_rss");
    let base = format!("http://127.0.0.1:{port}");
    let yaml = db.yaml(&format!(
        "  binance:\n    spot:\n      rest_url: \"{base}/api/v3/klines\"\n    archive_url: \"{base}\"\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("app.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    let start = 1_577_836_800_000i64; // 2020-01-01
    let mut end = start;
    for _ in 0..12 * years {
        end = next_month_start(end);
    }
    let t = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "--config",
            cfg_path.to_str().unwrap(),
            "backfill-gap",
            "--market",
            "spot",
            "--symbol",
            "BTCUSDT",
            "--period",
            "1m",
            "--start_ms",
            &start.to_string(),
            "--end_ms",
            &end.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_kb = 0u64;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "backfill-gap failed");
            break;
        }
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let mut summary = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary)
        .unwrap();
    let _ = sim.kill();
    let _ = sim.wait();
    println!(
        "| peak RSS, {years} year(s) of spot 1m ({}) | {:.0} MB peak RSS, {secs:.0} s | — | target < 200 MB |",
        summary.trim(),
        peak_kb as f64 / 1024.0
    );
}
