//! Backtest benchmark (issue "Backtest engine", §5), side by side with vectorbt 1.2.0 in one run:
//! 1. one run of `sma_cross(10,20)`, long only, fees 0, over N synthetic 1m candles (default
//!    1,000,000): indicators + signals + simulation + every statistic, against vectorbt's
//!    MA + crossed_above/below + `Portfolio.from_signals` + `pf.stats()` (warm: after its JIT
//!    compiled, on the same candles);
//! 2. a grid of 100 combinations (fast 5..50 step 5 × slow 60..150 step 10), ours on every core
//!    through the command's grid runner, against vectorbt's vectorised grid;
//! 3. the run of 1. reading the candles from ClickHouse (a private server) instead: the read's
//!    share of the wall time.
//!
//! Both sides fill at the deciding candle's close with all the cash, fractional quantities
//! (ours: `Fill::Close`, `Sizing::Fraction` with a 1e-8 step; vectorbt's defaults), so the
//! trade counts must agree; the bench checks that.
//!
//! Run: `QS_BENCH_VBT_PYTHON=/tmp/vbtvenv/bin/python cargo bench --bench backtest` (the
//! python with vectorbt 1.2.0, see scripts/bench-vectorbt.py; without it only our side runs).
//! `QS_BENCH_CANDLES` = N, `QS_BENCH_RUNS` = runs per side (default 5; medians shown),
//! `QS_BENCH_VBT_CHUNK` = grid columns per vectorbt call (default 10), `QS_BENCH_NO_CH=1` skips 3.
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use common::{env_usize, median};

use std::io::{BufWriter, Write};
use std::process::Command;
use std::time::Instant;

use qs_core::backtest::{self as bt, strategies, Fill, Options, Series, Sizing};
use qs_core::indicators::Bar;
use quantservice::backtest::run::{self, Maker};
use rand::{Rng, SeedableRng};

const MIN: i64 = 60_000;
const START: i64 = 1_577_836_800_000; // 2020-01-01

/// A seeded random walk of `n` 1m candles, prices rounded to cents as a CSV would carry them.
fn synthetic(n: usize) -> Series {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut s = Series::default();
    let mut close = 30_000.0f64;
    let cents = |x: f64| (x * 100.0).round() / 100.0;
    for i in 0..n {
        let open = close;
        close = cents((open * (1.0 + rng.random_range(-0.002..0.002))).max(1.0));
        let high = cents(open.max(close) * (1.0 + rng.random_range(0.0..0.001)));
        let low = cents(open.min(close) * (1.0 - rng.random_range(0.0..0.001)));
        let volume = (rng.random_range(0.0..50.0f64) * 1e4).round() / 1e4;
        s.push(
            START + i as i64 * MIN,
            &Bar {
                open,
                high,
                low,
                close,
                volume,
                quote_volume: volume * close,
            },
        );
    }
    s
}

fn options() -> Options {
    Options {
        cash: 10_000.0,
        commission: 0.0,
        sizing: Sizing::Fraction { step: 1e-8 },
        fill: Fill::Close,
        long_only: true,
        ..Options::default()
    }
}

fn grid_axes() -> (Vec<u32>, Vec<u32>) {
    (
        (1..=10).map(|k| 5 * k).collect(),
        (6..=15).map(|k| 10 * k).collect(),
    )
}

fn main() {
    let n = env_usize("QS_BENCH_CANDLES", 1_000_000);
    let runs = env_usize("QS_BENCH_RUNS", 5).max(1);
    let chunk = env_usize("QS_BENCH_VBT_CHUNK", 10).max(1);
    let series = synthetic(n);
    let o = options();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let (fasts, slows) = grid_axes();
    let combos: Vec<Vec<(String, f64)>> = fasts
        .iter()
        .flat_map(|&f| {
            slows.iter().map(move |&s| {
                vec![
                    ("fast".to_string(), f64::from(f)),
                    ("slow".to_string(), f64::from(s)),
                ]
            })
        })
        .collect();
    let maker = Maker::Builtin("sma_cross".to_string());

    // vectorbt first (its own process), on the same candles.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bars.csv");
    {
        let mut w = BufWriter::new(std::fs::File::create(&csv).unwrap());
        writeln!(w, "time,open,high,low,close,volume").unwrap();
        for i in 0..n {
            let b = series.bar(i);
            writeln!(
                w,
                "{},{},{},{},{},{}",
                series.time[i], b.open, b.high, b.low, b.close, b.volume
            )
            .unwrap();
        }
        w.flush().unwrap();
    }
    let join = |v: &[u32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let vbt: Option<serde_json::Value> = std::env::var("QS_BENCH_VBT_PYTHON").ok().and_then(|py| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-vectorbt.py");
        eprintln!("vectorbt: {runs} run(s) of each side after a warm-up ...");
        let out = Command::new(py)
            .arg(script)
            .arg(&csv)
            .arg(runs.to_string())
            .args(["10", "20"])
            .arg(join(&fasts))
            .arg(join(&slows))
            .arg(chunk.to_string())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("vectorbt failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        serde_json::from_slice(String::from_utf8_lossy(&out.stdout).trim().as_bytes()).ok()
    });

    // Ours: one run, then the grid.
    let mut single = Vec::new();
    let mut trades = 0;
    let mut final_value = 0.0;
    for _ in 0..runs {
        let t = Instant::now();
        let mut s = strategies::build("sma_cross", &[("fast".into(), 10.0), ("slow".into(), 20.0)])
            .unwrap();
        let out = bt::run(s.as_mut(), &series, &o);
        single.push(t.elapsed().as_secs_f64());
        trades = out.stats.trades + out.open_trades;
        final_value = out.stats.equity_final;
    }
    let mut grid = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let (results, skipped) =
            run::run_grid(&maker, &combos, &series, &o, threads, false, &|| {});
        grid.push(t.elapsed().as_secs_f64());
        assert_eq!(results.len(), 100);
        assert!(skipped.is_empty());
    }
    let ours_single = median(&mut single);
    let ours_grid = median(&mut grid);

    // 3. The same run from ClickHouse.
    let ch = if std::env::var_os("QS_BENCH_NO_CH").is_none() {
        Some(from_clickhouse(&series, &o, runs))
    } else {
        None
    };

    println!();
    println!("{n} synthetic 1m candles, sma_cross long only, fees 0; {runs} run(s) per side, medians; {threads} threads");
    println!("| benchmark | ours | vectorbt 1.2.0 | ours ÷ vectorbt time | target |");
    println!("|---|---|---|---|---|");
    let v = |k: &str| vbt.as_ref().and_then(|j| j[k].as_f64());
    let row = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.2}× faster | ≥ 2× |",
            ours * 1e3,
            t * 1e3,
            t / ours
        ),
        None => println!("| {name} | {:.1} ms | (not run) | | ≥ 2× |", ours * 1e3),
    };
    row(
        "one run, sma_cross(10,20): indicators + signals + simulation + statistics",
        ours_single,
        v("single_s"),
    );
    row("grid of 100 combinations", ours_grid, v("grid_s"));
    println!();
    println!(
        "trades (closed + open): ours {trades}, vectorbt {}; final equity: ours {final_value:.4}, vectorbt {}",
        vbt.as_ref().map_or("-".to_string(), |j| j["single_trades"].to_string()),
        vbt.as_ref().map_or("-".to_string(), |j| j["single_final_value"].to_string()),
    );
    if let Some((read, total)) = ch {
        println!(
            "from ClickHouse: read {:.1} ms + run = {:.1} ms wall: the read is {:.0} % of it",
            read * 1e3,
            total * 1e3,
            read / total * 100.0
        );
    }
}

/// Stores the candles in a private ClickHouse, then times `load_stored` + the run: (read, total).
fn from_clickhouse(series: &Series, o: &Options, runs: usize) -> (f64, f64) {
    use quantservice::market::{Decimal, Kline, PairKey, Source};
    use quantservice::store::writer::Writer;
    use quantservice::store::{migrate, Store};
    let db = common::TestDb::new_private("bench_bt");
    let cfg = db.config("  writer:\n    batch_rows: 100000\n    flush_interval: 200ms\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let dec = |x: f64| format!("{x}").parse::<Decimal>().unwrap();
    rt.block_on(async {
        let store = Store::new(&cfg.clickhouse).unwrap();
        migrate::run(&store).await.unwrap();
        let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
        let task = tokio::spawn(writer.run(tokio_util::sync::CancellationToken::new()));
        let t = Instant::now();
        let mut rows = Vec::with_capacity(100_000);
        for i in 0..series.len() {
            let b = series.bar(i);
            rows.push(Kline {
                pair: pair.clone(),
                open_time: series.time[i],
                close_time: series.time[i] + MIN - 1,
                open: dec(b.open),
                high: dec(b.high),
                low: dec(b.low),
                close: dec(b.close),
                volume: dec(b.volume),
                quote_volume: dec((b.quote_volume * 1e4).round() / 1e4),
                trades: 1,
                taker_buy_volume: Decimal::ZERO,
                taker_buy_quote_volume: Decimal::ZERO,
                is_final: true,
                source: Source::Archive,
            });
            if rows.len() == 100_000 {
                handle.send_many(std::mem::take(&mut rows)).await.unwrap();
            }
        }
        handle.send_many(rows).await.unwrap();
        drop(handle);
        task.await.unwrap().unwrap();
        eprintln!(
            "stored {} candles in {:.1} s",
            series.len(),
            t.elapsed().as_secs_f64()
        );
        let mut reads = Vec::new();
        let mut totals = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let s = run::load_stored(&store, &pair, None, None).await.unwrap();
            let read = t.elapsed().as_secs_f64();
            assert_eq!(s.len(), series.len());
            let mut st =
                strategies::build("sma_cross", &[("fast".into(), 10.0), ("slow".into(), 20.0)])
                    .unwrap();
            let _ = bt::run(st.as_mut(), &s, o);
            reads.push(read);
            totals.push(t.elapsed().as_secs_f64());
        }
        (median(&mut reads), median(&mut totals))
    })
}
