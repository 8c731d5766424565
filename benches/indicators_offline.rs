//! Offline indicators benchmark (issue "Technical indicators", §8, "Offline end to end"):
//! the 15-indicator set computed by `quantservice indicators` over N stored um 1m candles of
//! one pair (read from ClickHouse, compute, write back), wall time and `indicators` rows/s,
//! against `clickhouse-client` inserting the very same output rows from a TSV file in the same
//! run (target ≥ 0.8×): the file as `SELECT *` exports them, and the same file sorted by the
//! table's key (the anchor's best case: ClickHouse skips sorting a block that is in key order,
//! as it does for ours).
//!
//! Run: `cargo bench --bench indicators_offline` (starts a private ClickHouse; needs
//! `clickhouse-client`). `QS_BENCH_CANDLES` = N (default 1,000,000), `QS_BENCH_RUNS` = runs
//! of each side, interleaved (default 3; the table shows medians); `QS_BENCH_EXTRA` = YAML
//! appended under `app:` of the command's config (e.g. a `writer:` section).
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use common::{env_usize, median};

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::TestDb;
use quantservice::store::{migrate, Store};
use quantservice::tasks::indicators::api::STANDARD_SET;
use rand::{Rng, SeedableRng};

const MIN: i64 = 60_000;
const START: i64 = 1_577_836_800_000; // 2020-01-01

/// `clickhouse-client` on the private server, in `db`, with `query`; stdin/stdout as given.
fn client(tcp: u16, db: &str, query: &str) -> Command {
    let mut c = Command::new("clickhouse-client");
    c.args([
        "--port",
        &tcp.to_string(),
        "--database",
        db,
        "--query",
        query,
    ]);
    c
}

/// Writes `n` um 1m BTCUSDT candles (a seeded random walk, final) as TSV in klines' column
/// order of the INSERT below.
fn write_candles(path: &Path, n: usize) {
    let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut close = 30_000.0f64;
    for i in 0..n {
        let t = START + i as i64 * MIN;
        let open = close;
        close = (open * (1.0 + rng.random_range(-0.002..0.002))).max(1.0);
        let high = open.max(close) * (1.0 + rng.random_range(0.0..0.001));
        let low = open.min(close) * (1.0 - rng.random_range(0.0..0.001));
        let volume = rng.random_range(0.0..50.0);
        let quote = volume * (open + close) / 2.0;
        let trades = rng.random_range(1..2000u32);
        writeln!(
            out,
            "um\tBTCUSDT\t1m\t{t}\t{}\t{open:.2}\t{high:.2}\t{low:.2}\t{close:.2}\t{volume:.8}\t{quote:.8}\t{trades}\t{:.8}\t{:.8}\t1\tarchive\t0\t1",
            t + MIN - 1,
            volume / 2.0,
            quote / 2.0,
        )
        .unwrap();
    }
    out.flush().unwrap();
}

fn main() {
    let n = env_usize("QS_BENCH_CANDLES", 1_000_000);
    let runs = env_usize("QS_BENCH_RUNS", 3).max(1);
    let bin = env!("CARGO_BIN_EXE_quantservice");
    let server = common::private();
    let tcp = server
        .tcp_port()
        .expect("the anchor needs a private clickhouse-server (not the chdb lane)");
    let db = TestDb::new_private("bench_ind");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("app.yaml");
    let extra = std::env::var("QS_BENCH_EXTRA").unwrap_or_default();
    std::fs::write(&cfg_path, db.yaml(&extra)).unwrap();

    // Schema (the real migrations), then the candles: not measured.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = db.config(&extra);
    rt.block_on(async {
        let store = Store::new(&cfg.clickhouse).unwrap();
        migrate::run(&store).await.unwrap();
    });
    let candles = dir.path().join("candles.tsv");
    let t = Instant::now();
    write_candles(&candles, n);
    let status = client(
        tcp,
        &db.name,
        "INSERT INTO klines (market, symbol, period, open_time, close_time, open, high, low, \
         close, volume, quote_volume, trades, taker_buy_volume, taker_buy_quote_volume, \
         is_final, source, ingested_at, version) FORMAT TabSeparated",
    )
    .stdin(std::fs::File::open(&candles).unwrap())
    .status()
    .unwrap();
    assert!(status.success(), "loading the candles failed");
    assert_eq!(
        db.sql("SELECT count() FROM klines").trim(),
        n.to_string(),
        "candles stored"
    );
    eprintln!(
        "loaded {n} candles in {:.1} s; {runs} interleaved run(s) of each side",
        t.elapsed().as_secs_f64()
    );
    std::fs::remove_file(&candles).unwrap();

    let rows_file = dir.path().join("indicators.tsv");
    let sorted_file = dir.path().join("indicators-sorted.tsv");
    let mut args: Vec<String> = [
        "--config",
        cfg_path.to_str().unwrap(),
        "indicators",
        "--market",
        "um",
        "--symbol",
        "BTCUSDT",
        "--period",
        "1m",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    for s in STANDARD_SET {
        args.push("--indicator".into());
        args.push(s.into());
    }
    db.sql("CREATE TABLE anchor AS indicators");

    let (mut ours_s, mut anchor_s, mut sorted_s, mut csv_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0u64;
    for run in 0..runs {
        // Ours: the real binary, end to end (read, compute, write back, flushed).
        db.sql("TRUNCATE TABLE indicators");
        let t = Instant::now();
        let out = Command::new(bin)
            .args(&args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "quantservice indicators failed: {summary}"
        );
        let stored: u64 = db
            .sql("SELECT count() FROM indicators")
            .trim()
            .parse()
            .unwrap();
        let reported = summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rows="))
            .and_then(|v| v.parse::<u64>().ok());
        assert_eq!(reported, Some(stored), "{summary}");
        assert!(stored > 0);
        if run > 0 {
            assert_eq!(stored, rows, "every run writes the same rows");
        }
        rows = stored;
        ours_s.push(secs);
        eprintln!("run {run}: ours {secs:.2} s ({summary})");

        // The anchor's file: the very rows ours wrote (exported once, not measured).
        if run == 0 {
            let status = client(
                tcp,
                &db.name,
                "SELECT * FROM indicators FORMAT TabSeparated",
            )
            .stdout(std::fs::File::create(&rows_file).unwrap())
            .status()
            .unwrap();
            assert!(status.success(), "export failed");
            let status = client(
                tcp,
                &db.name,
                "SELECT * FROM indicators \
                 ORDER BY market, symbol, period, indicator, output, open_time \
                 FORMAT TabSeparated",
            )
            .stdout(std::fs::File::create(&sorted_file).unwrap())
            .status()
            .unwrap();
            assert!(status.success(), "sorted export failed");
        }
        // Anchor: clickhouse-client inserting them into a table of identical schema, from the
        // file as exported and from the file in key order.
        for (file, times, what) in [
            (&rows_file, &mut anchor_s, "anchor"),
            (&sorted_file, &mut sorted_s, "anchor, sorted file"),
        ] {
            db.sql("TRUNCATE TABLE anchor");
            let t = Instant::now();
            let status = client(tcp, &db.name, "INSERT INTO anchor FORMAT TabSeparated")
                .stdin(std::fs::File::open(file).unwrap())
                .status()
                .unwrap();
            let secs = t.elapsed().as_secs_f64();
            assert!(status.success(), "clickhouse-client insert failed");
            assert_eq!(
                db.sql("SELECT count() FROM anchor").trim(),
                rows.to_string()
            );
            times.push(secs);
            eprintln!("run {run}: {what} {secs:.2} s");
        }

        // Where the time goes: the same command with `--csv` (read and compute, no insert).
        let csv = dir.path().join("values.csv");
        let t = Instant::now();
        let out = Command::new(bin)
            .args(&args)
            .arg("--csv")
            .arg(&csv)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "quantservice indicators --csv failed");
        std::fs::remove_file(&csv).unwrap();
        csv_s.push(secs);
        eprintln!("run {run}: read + compute only (--csv) {secs:.2} s");
    }
    let what = if runs > 1 {
        format!("median of {runs}")
    } else {
        "one run".to_string()
    };
    let (o, a) = (median(&mut ours_s), median(&mut anchor_s));
    let (or, ar) = (rows as f64 / o, rows as f64 / a);
    println!(
        "| benchmark | ours wall s | ours rows/s | anchor wall s | anchor rows/s | ratio | target |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| 15 indicators offline over {n} stored um 1m candles, {rows} `indicators` rows ({what}) | {o:.2} | {or:.0} | {a:.2} | {ar:.0} (`clickhouse-client`, TSV) | {:.2}× | ≥ 0.8× |",
        or / ar
    );
    let s = median(&mut sorted_s);
    let sr = rows as f64 / s;
    println!(
        "| the same, anchor file sorted by the table key ({what}) | {o:.2} | {or:.0} | {s:.2} | {sr:.0} (`clickhouse-client`, TSV in key order) | {:.2}× | ≥ 0.8× |",
        or / sr
    );
    println!(
        "| the same command with `--csv` (read + compute + CSV, no insert; {what}) | {:.2} | — | — | — | — | — |",
        median(&mut csv_s)
    );
}
