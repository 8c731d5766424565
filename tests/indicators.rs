//! Indicators against real ClickHouse: `quantservice indicators` (the binary) over real candles
//! stored through the writer gives exactly `batch()` of the same bars (bit for bit, warm-up from
//! the series start, only `[start_ms, end_ms)` written, readable per pair through
//! `indicators_{symbol}_{market}_{period}` with FINAL); `--csv` writes the same values; clear
//! errors (no stored candles, bad spec, ClickHouse down) with exit 1.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{dead_port, TestDb};
use quantservice::market::{Kline, PairKey};
use quantservice::store::migrate;
use quantservice::store::writer::Writer;
use quantservice::store::Store;
use quantservice::tasks::indicators::api::{batch, Bar, Spec};
use tokio_util::sync::CancellationToken;

/// The specs the offline tests compute (every output kind the API has).
const SPECS: &[&str] = &[
    "rsi(14)",
    "macd(12,26,9)",
    "bbands(20,2,2)",
    "stoch(5,3,3)",
    "donchian(20)",
    "adx(14)",
    "vwap(20)",
    "obv",
];

fn load_csv(rel: &str, pair: &PairKey) -> Vec<Kline> {
    common::binance_klines(rel, pair)
}

/// Stores `rows` through the writer; returns the store.
async fn stored(db: &TestDb, rows: Vec<Kline>) -> Store {
    common::store_klines(db, rows).await
}

fn bin(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, db.yaml("")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .env_remove("QS_CONFIG_PATH")
        .env_remove("RUST_LOG")
        .arg("--config")
        .arg(&path)
        .arg("indicators")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spec_args(specs: &[&str]) -> Vec<String> {
    specs
        .iter()
        .flat_map(|s| ["--indicator".to_string(), s.to_string()])
        .collect()
}

/// Expected values: `batch()` of every spec over `klines` (the whole series), keyed like the
/// table: (open_time, indicator, output) -> value, warm-up (NaN) left out.
fn expected(
    klines: &[Kline],
    specs: &[&str],
    from: i64,
    to: i64,
) -> BTreeMap<(i64, String, String), f64> {
    let bars: Vec<Bar> = klines.iter().map(Bar::from_kline).collect();
    let mut out = BTreeMap::new();
    for text in specs {
        let spec = Spec::parse(text).unwrap();
        let values = batch(&spec, &bars);
        for (output, series) in spec.outputs().iter().zip(&values) {
            for (k, v) in klines.iter().zip(series) {
                if !v.is_nan() && k.open_time >= from && k.open_time < to {
                    out.insert((k.open_time, spec.to_string(), output.to_string()), *v);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_values_written_to_clickhouse_equal_batch_bit_for_bit() {
    let db = TestDb::new("ind_offline");
    let pair = PairKey::parse("um", "ETHUSDT", "1h").unwrap();
    let klines = load_csv("um/ETHUSDT-1h-2024-01-01_2025-12-20.csv", &pair);
    assert!(klines.len() > 10_000);
    // Stored out of order and twice (a replaced version), as a series grows in real life.
    let mut rows = klines.clone();
    rows.reverse();
    rows.extend(klines[..500].iter().cloned());
    let store = stored(&db, rows).await;

    // A sub-range in the middle: values there warm up from the series start.
    let from = klines[7_000].open_time;
    let to = klines[9_000].open_time;
    let mut args = spec_args(SPECS);
    args.extend([
        "--start_ms".to_string(),
        from.to_string(),
        "--end_ms".to_string(),
        to.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut full = vec!["--symbol", "ETHUSDT", "--market", "um", "--period", "1h"];
    full.extend(args);
    let (code, stdout, stderr) = bin(&db, &full);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");

    let want = expected(&klines, SPECS, from, to);
    assert!(!want.is_empty());
    let rows: Vec<(i64, String, String, f64)> = store
        .client()
        .query(
            "SELECT open_time, indicator, output, value FROM indicators FINAL \
             WHERE market = 'um' AND symbol = 'ETHUSDT' AND period = '1h' \
             ORDER BY open_time, indicator, output",
        )
        .fetch_all()
        .await
        .unwrap();
    let got: BTreeMap<(i64, String, String), f64> = rows
        .into_iter()
        .map(|(t, i, o, v)| ((t, i, o), v))
        .collect();
    assert_eq!(got.len(), want.len(), "only [start_ms, end_ms) is written");
    for (key, v) in &want {
        let g = got.get(key).unwrap_or_else(|| panic!("{key:?} missing"));
        assert_eq!(g.to_bits(), v.to_bits(), "{key:?}: {g} != {v}");
    }
    // The summary line and the per-pair view.
    assert!(
        stdout.contains(&format!("in_range={}", 2_000))
            && stdout.contains(&format!("rows={}", want.len())),
        "{stdout}"
    );
    let via_view = db.sql("SELECT count() FROM indicators_ethusdt_um_1h");
    assert_eq!(via_view.trim(), want.len().to_string());

    // Run again over everything: the latest computation wins, still one row per key.
    let mut again = vec!["--symbol", "ETHUSDT", "--market", "um", "--period", "1h"];
    let specs = spec_args(SPECS);
    again.extend(specs.iter().map(String::as_str));
    let (code, stdout, stderr) = bin(&db, &again);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let all = expected(&klines, SPECS, i64::MIN, i64::MAX);
    let n =
        db.sql("SELECT count() FROM indicators FINAL WHERE market = 'um' AND symbol = 'ETHUSDT'");
    assert_eq!(n.trim(), all.len().to_string());
}

/// The series is read in chunks through primary-key windows `limit` periods wide: holes wider
/// than a window, replaced versions and open candles must not change what a chunked read sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_reads_see_the_whole_series_across_holes_wider_than_a_window() {
    let db = TestDb::new("ind_chunks");
    let pair = PairKey::parse("um", "ETHUSDT", "1h").unwrap();
    let klines = load_csv("um/ETHUSDT-1h-2024-01-01_2025-12-20.csv", &pair);
    // Holes of 1, 40 and 3,000 hours (the last is wider than windows of 50 and 997 hours).
    let mut series: Vec<Kline> = klines[..2_000].to_vec();
    series.extend(klines[2_001..2_500].iter().cloned());
    series.extend(klines[2_540..4_000].iter().cloned());
    series.extend(klines[7_000..7_300].iter().cloned());
    let mut rows = series.clone();
    rows.extend(series[100..300].iter().cloned()); // replaced versions
    let mut open = klines[7_300].clone(); // an open candle after the last final one
    open.is_final = false;
    rows.push(open);
    let store = stored(&db, rows).await;

    for limit in [50u64, 997, 10_000] {
        let mut seen = Vec::new();
        let mut after = i64::MIN;
        loop {
            let chunk = store.final_klines_after(&pair, after, limit).await.unwrap();
            assert!(chunk.len() as u64 <= limit);
            seen.extend(chunk.iter().map(|k| k.open_time));
            match chunk.last() {
                Some(k) if chunk.len() as u64 == limit => after = k.open_time,
                _ => break,
            }
        }
        let want: Vec<i64> = series.iter().map(|k| k.open_time).collect();
        assert_eq!(seen.len(), want.len(), "limit {limit}");
        assert!(seen == want, "limit {limit}: chunks differ from the series");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_has_one_column_per_output_and_empty_warm_up_cells() {
    let db = TestDb::new("ind_csv");
    let pair = PairKey::parse("spot", "BTCUSDT", "1h").unwrap();
    let klines = load_csv("spot/BTCUSDT-1h-2022-01.csv", &pair);
    let _store = stored(&db, klines.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("out.csv");
    let mut args = vec!["--symbol", "BTCUSDT", "--market", "spot", "--period", "1h"];
    let specs = spec_args(SPECS);
    args.extend(specs.iter().map(String::as_str));
    let csv_arg = csv.display().to_string();
    args.extend(["--csv", &csv_arg]);
    let (code, stdout, stderr) = bin(&db, &args);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("csv="), "{stdout}");
    assert_eq!(
        db.sql("SELECT count() FROM indicators").trim(),
        "0",
        "--csv writes no rows"
    );

    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header = split_csv(lines.next().unwrap());
    let parsed: Vec<Spec> = SPECS.iter().map(|s| Spec::parse(s).unwrap()).collect();
    let mut columns = vec!["open_time".to_string()];
    for s in &parsed {
        if s.outputs().len() == 1 {
            columns.push(s.to_string());
        } else {
            columns.extend(s.outputs().iter().map(|o| format!("{s}.{o}")));
        }
    }
    assert_eq!(header, columns);
    let bars: Vec<Bar> = klines.iter().map(Bar::from_kline).collect();
    let want: Vec<Vec<f64>> = parsed.iter().flat_map(|s| batch(s, &bars)).collect();
    let body: Vec<Vec<String>> = lines.map(split_csv).collect();
    assert_eq!(body.len(), klines.len());
    for (i, (row, k)) in body.iter().zip(&klines).enumerate() {
        assert_eq!(row[0], k.open_time.to_string());
        for (c, series) in want.iter().enumerate() {
            let cell = &row[c + 1];
            if series[i].is_nan() {
                assert_eq!(cell, "", "warm-up cell {i}/{c} must be empty");
            } else {
                assert_eq!(
                    cell.parse::<f64>().unwrap().to_bits(),
                    series[i].to_bits(),
                    "{i}/{c}"
                );
            }
        }
    }
}

fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_exit_1() {
    let db = TestDb::new("ind_errors");
    let pair = PairKey::parse("spot", "BTCUSDT", "1h").unwrap();
    let klines = load_csv("spot/BTCUSDT-1h-2022-01.csv", &pair);
    let _store = stored(&db, klines[..50].to_vec()).await;
    let base = [
        "--market",
        "spot",
        "--period",
        "1h",
        "--indicator",
        "sma(5)",
    ];

    let mut args = vec!["--symbol", "ETHUSDT"];
    args.extend(base);
    let (code, _, stderr) = bin(&db, &args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no stored candles for spot:ETHUSDT:1h"),
        "{stderr}"
    );

    let (code, _, stderr) = bin(
        &db,
        &[
            "--symbol",
            "BTCUSDT",
            "--market",
            "spot",
            "--period",
            "1h",
            "--indicator",
            "foo(3)",
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("bad indicator spec \"foo(3)\""), "{stderr}");

    let (code, _, stderr) = bin(
        &db,
        &[
            "--symbol",
            "BTC-USDT",
            "--market",
            "spot",
            "--period",
            "1h",
            "--indicator",
            "sma(5)",
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("symbol"), "{stderr}");

    let mut down = TestDb::new("ind_down");
    down.port = dead_port();
    let mut args = vec!["--symbol", "BTCUSDT"];
    args.extend(base);
    let (code, _, stderr) = bin(&down, &args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
}

/// Every value of the pair in `indicators` (FINAL), keyed like `expected()`.
async fn stored_values(store: &Store, pair: &PairKey) -> BTreeMap<(i64, String, String), f64> {
    let rows: Vec<(i64, String, String, f64)> = store
        .client()
        .query(
            "SELECT open_time, indicator, output, value FROM indicators FINAL \
             WHERE market = ? AND symbol = ? AND period = ?",
        )
        .bind(pair.market.as_str())
        .bind(pair.symbol.as_str())
        .bind(pair.period.as_str())
        .fetch_all()
        .await
        .unwrap_or_default();
    rows.into_iter()
        .map(|(t, i, o, v)| ((t, i, o), v))
        .collect()
}

fn same_bits(
    a: &BTreeMap<(i64, String, String), f64>,
    b: &BTreeMap<(i64, String, String), f64>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && va.to_bits() == vb.to_bits())
}

/// Waits until the stored values are exactly `want` (the offline computation).
async fn wait_values(
    store: &Store,
    pair: &PairKey,
    want: &BTreeMap<(i64, String, String), f64>,
    what: &str,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let got = stored_values(store, pair).await;
        if same_bits(&got, want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: stored values never matched the offline ones ({} stored, {} expected; first difference {:?})",
            got.len(),
            want.len(),
            want.iter().find(|(k, v)| got.get(*k).map(|g| g.to_bits()) != Some(v.to_bits()))
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The daemon's indicator tasks on one writer: the stored history first, then each closed
/// candle the writer commits; a hole healed after the online state passed it is recomputed
/// (values equal the offline computation over the completed series, bit for bit, no stale
/// value); after a restart the task resumes from a checkpoint (earlier values are not
/// rewritten) and still equals the computation from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_values_heal_with_late_candles_and_resume_from_checkpoints() {
    use quantservice::tasks::indicators::IndicatorTask;

    let db = TestDb::new("ind_online");
    let pair = PairKey::parse("um", "ETHUSDT", "1h").unwrap();
    let klines: Vec<Kline> = load_csv("um/ETHUSDT-1h-2024-01-01_2025-12-20.csv", &pair)
        .into_iter()
        .take(2_000)
        .collect();
    const ONLINE: &[&str] = &["rsi(14)", "macd(12,26,9)", "bbands(20,2,2)", "adx(14)"];
    let cfg = db.config("  writer:\n    batch_rows: 5000\n    flush_interval: 50ms\n");
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let (writer, handle) = Writer::new(store.clone(), cfg.writer);
    let writer_task = tokio::spawn(writer.run(CancellationToken::new()));

    // History with a hole at 500..503.
    let hole = 500..503;
    let history: Vec<Kline> = klines[..1_000]
        .iter()
        .enumerate()
        .filter(|(i, _)| !hole.contains(i))
        .map(|(_, k)| k.clone())
        .collect();
    handle.send_many(history.clone()).await.unwrap();

    let start = |cancel: &CancellationToken| {
        ONLINE
            .iter()
            .map(|s| {
                let mut task = IndicatorTask::new(
                    pair.clone(),
                    Spec::parse(s).unwrap(),
                    store.clone(),
                    handle.clone(),
                );
                task.checkpoint_every = 200;
                tokio::spawn(task.run(cancel.child_token()))
            })
            .collect::<Vec<_>>()
    };
    let cancel = CancellationToken::new();
    let tasks = start(&cancel);
    wait_values(
        &store,
        &pair,
        &expected(&history, ONLINE, i64::MIN, i64::MAX),
        "history",
    )
    .await;

    // Online: candles as the live stream writes them, one by one.
    let mut series = history.clone();
    for k in &klines[1_000..1_300] {
        handle.send(k.clone()).await.unwrap();
        series.push(k.clone());
    }
    wait_values(
        &store,
        &pair,
        &expected(&series, ONLINE, i64::MIN, i64::MAX),
        "online",
    )
    .await;

    // The hole is healed after the online state passed it.
    handle
        .send_many(klines[hole.clone()].to_vec())
        .await
        .unwrap();
    let complete: Vec<Kline> = klines[..1_300].to_vec();
    wait_values(
        &store,
        &pair,
        &expected(&complete, ONLINE, i64::MIN, i64::MAX),
        "healed",
    )
    .await;
    // Observed state: every indicator live at the last candle.
    let live = format!("live\t{}", klines[1_299].open_time);
    common::wait_for(30, "indicator_status live at the last candle", || async {
        let status = db.sql(
            "SELECT indicator, phase, last_open_time FROM indicator_status FINAL ORDER BY indicator",
        );
        status.lines().count() == ONLINE.len() && status.lines().all(|l| l.ends_with(&live))
    })
    .await;

    // Restart: stopped, more candles meanwhile, started again.
    cancel.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let early = klines[1_000].open_time;
    let versions = |db: &TestDb| {
        db.sql(&format!(
            "SELECT max(version) FROM indicators WHERE open_time < {early}"
        ))
    };
    let before = versions(&db);
    handle.send_many(klines[1_300..].to_vec()).await.unwrap();
    let cancel = CancellationToken::new();
    let tasks = start(&cancel);
    wait_values(
        &store,
        &pair,
        &expected(&klines, ONLINE, i64::MIN, i64::MAX),
        "resumed",
    )
    .await;
    assert_eq!(
        versions(&db),
        before,
        "resumed from a checkpoint: values before it are not recomputed"
    );
    cancel.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    drop(handle);
    writer_task.await.unwrap().unwrap();
}

/// The daemon end to end: an indicator declared with SQL on a running daemon (next to a bad
/// one, reported in pair_status and blocking nothing) is computed over the pair's whole stored
/// history and then kept up to date live, equal to the offline computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indicator_declared_with_sql_on_a_running_daemon_covers_history_then_live() {
    use quantservice::market::{Market, Period};
    let sim = qs_sim::start(qs_sim::SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(std::time::Duration::from_millis(100)));
    let db = TestDb::new("ind_daemon");
    let fast = "  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n    stop_timeout: 2s\n    restart_backoff: 200ms\n  streams:\n    late_grace: 1s\n  gap_scan:\n    grace: 3s\n    schedules:\n      1s: \"* * * * * *\"\n";
    let yaml = db.yaml(&format!(
        "{}{fast}",
        common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
    ));
    let (_dir, path, cfg) = common::write_config(&yaml);
    let (task, shutdown) = common::spawn_daemon(cfg, &path);
    common::wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    let pair = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    let from = Period::S1.align(qs_sim::now_ms()) - 60_000;
    let insert = |indicators: &str| {
        db.sql(&format!(
            "INSERT INTO trading_pairs (market, symbol, period, backfill_from, indicators) \
             VALUES ('spot', 'BTCUSDT', '1s', {from}, '{indicators}')"
        ));
    };
    insert("");
    common::wait_for(30, "history stored", || async {
        common::count(&db, "SELECT count() FROM klines FINAL WHERE is_final = 1") >= 60
    })
    .await;

    let declared_at = qs_sim::now_ms();
    insert("SMA(5), bad(1)");
    let store = Store::new(&db.config("").clickhouse).unwrap();
    common::wait_for(30, "the bad spec in pair_status", || async {
        db.try_sql("SELECT last_error FROM pair_status FINAL WHERE symbol = 'BTCUSDT'")
            .is_ok_and(|s| s.contains("invalid indicator spec") && s.contains("bad"))
    })
    .await;
    // Live: values for candles that closed after the declaration, equal to offline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let last: i64 = db
            .try_sql(
                "SELECT last_open_time FROM indicator_status FINAL \
                 WHERE indicator = 'sma(5)' AND phase = 'live'",
            )
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if last > declared_at + 3_000 {
            let series = store
                .final_klines_after(&pair, i64::MIN, 1_000_000)
                .await
                .unwrap();
            let upto: Vec<Kline> = series.into_iter().filter(|k| k.open_time <= last).collect();
            let want = expected(&upto, &["sma(5)"], i64::MIN, i64::MAX);
            let got: BTreeMap<_, _> = stored_values(&store, &pair)
                .await
                .into_iter()
                .filter(|((t, _, _), _)| *t <= last)
                .collect();
            if same_bits(&got, &want) {
                // The whole history: the first value is at the 5th stored candle.
                assert_eq!(got.keys().next().map(|k| k.0), Some(upto[4].open_time));
                assert!(
                    upto[0].open_time <= from + 1_000 && upto[0].open_time < declared_at - 30_000
                );
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sma(5) never matched the offline computation live (last computed {last})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
