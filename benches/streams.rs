//! Live-stream benchmark (issue "Operator", §9): 1,000 USD-M 1m streams on the simulator with
//! 250 ms updates, served to the real daemon binary (a separate process) writing to a real
//! ClickHouse. Measures, over `QS_BENCH_MINUTES` (default 10) minutes after a warm-up:
//! - latency from each candle's close (the simulator stamps the final event at the first 250 ms
//!   tick after it, so this is an upper bound of the event-time latency) to the row being
//!   visible in ClickHouse, p50/p99 (targets: p99 < 1.5 s);
//! - the daemon's CPU (utime+stime over wall time, % of one core; target < 25 %);
//! - the daemon's RSS every 10 s (target < 150 MB and flat).
//!
//! Run: `cargo bench --bench streams` (starts a private ClickHouse like the tests do).
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use qs_sim::{self as sim, SimConfig};
use quantservice::market::Market;

const STREAMS: usize = 1000;
const MIN: i64 = 60_000;

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn proc_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let minutes: i64 = std::env::var("QS_BENCH_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut cfg = SimConfig::default();
    let symbols: Vec<String> = (0..STREAMS).map(|i| format!("B{i:04}USDT")).collect();
    for s in &symbols {
        cfg = cfg.with_symbol(Market::Um, s, sim::DEFAULT_LISTING_MS);
    }
    let sim = sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(250)));
    let db = TestDb::new("bench_streams");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    let yaml = db.yaml(&format!(
        "{}  logging:\n    level: warn\n",
        common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
    ));
    std::fs::write(&path, yaml).unwrap();
    let mut child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_quantservice"))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.try_sql("SELECT count() FROM trading_pairs").is_err() {
        assert!(
            Instant::now() < deadline,
            "daemon did not create its schema"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let from = (sim::now_ms() / MIN) * MIN - 2 * MIN;
    let values: Vec<String> = symbols
        .iter()
        .map(|s| format!("('um', '{s}', '1m', 1, {from})"))
        .collect();
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, enabled, backfill_from) VALUES {}",
        values.join(", ")
    ));
    // Warm-up: all streams subscribed, backfills done, then the next minute boundary.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let subs: usize = sim
            .ws_open_connections()
            .iter()
            .map(|c| c.subscriptions.len())
            .sum();
        let done = db
            .try_sql(&format!(
                "SELECT uniqExact(symbol) FROM klines WHERE market = 'um' AND open_time = {from}"
            ))
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if subs == STREAMS && done == STREAMS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "warm-up: {subs} subscribed, {done} backfilled"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first_boundary = (sim::now_ms() / MIN + 1) * MIN;
    let wait = first_boundary - sim::now_ms() + 5_000;
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap())).await;

    let tck = clk_tck();
    let cpu0 = proc_cpu_ticks(pid);
    let t0 = Instant::now();
    let mut rss = vec![proc_rss_mb(pid)];
    let mut latencies: Vec<f64> = Vec::new();
    let mut missed = 0usize;
    let mut last_rss = Instant::now();
    for m in 1..=minutes {
        let boundary = first_boundary + m * MIN;
        let open = boundary - MIN;
        // Until just before the boundary: sample RSS.
        while sim::now_ms() < boundary - 100 {
            if last_rss.elapsed() >= Duration::from_secs(10) {
                rss.push(proc_rss_mb(pid));
                last_rss = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut seen: HashMap<String, i64> = HashMap::new();
        let stop = boundary + 10_000;
        while seen.len() < STREAMS && sim::now_ms() < stop {
            let out = db
                .try_sql(&format!(
                    "SELECT symbol FROM klines WHERE market = 'um' AND period = '1m' AND open_time = {open} AND source = 'ws' FORMAT TSV"
                ))
                .unwrap_or_default();
            let now = sim::now_ms();
            for s in out.lines() {
                seen.entry(s.to_string()).or_insert(now);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        missed += STREAMS - seen.len();
        latencies.extend(seen.values().map(|t| (t - boundary) as f64 / 1000.0));
        eprintln!(
            "minute {m}/{minutes}: {} of {STREAMS} closed candles seen",
            seen.len()
        );
    }
    let cpu = (proc_cpu_ticks(pid) - cpu0) as f64 / tck / t0.elapsed().as_secs_f64() * 100.0;
    rss.push(proc_rss_mb(pid));
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let max_rss = rss.iter().copied().fold(0.0, f64::max);
    println!("| benchmark | result | target |");
    println!("|---|---|---|");
    println!(
        "| latency candle close → row visible in ClickHouse, {STREAMS} um 1m streams at 250 ms, {} candles over {minutes} min | p50 {:.3} s, p99 {:.3} s, max {:.3} s; {missed} not seen from the stream within 10 s | p99 < 1.5 s |",
        latencies.len(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!("| daemon CPU over the {minutes} min | {cpu:.1} % of one core | < 25 % |");
    println!(
        "| daemon RSS every 10 s | first {:.1} MB, last {:.1} MB, max {max_rss:.1} MB ({} samples) | < 150 MB, flat |",
        rss[0],
        rss[rss.len() - 1],
        rss.len()
    );
}
